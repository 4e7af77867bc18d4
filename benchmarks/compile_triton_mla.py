"""Compile the MLA kernels (``ember.kernels.triton_mla``) offline for sm_90
(no GPU needed) at DeepSeek-V3's dimensions, in the configurations the
backend launches, and print each one's registers, stack/local bytes (spills) and shared memory.

    python benchmarks/compile_triton_mla.py
    # another Triton over the same torch, e.g. a Triton 3.6 install:
    PYTHONPATH=/path/to/triton36/site-packages python benchmarks/compile_triton_mla.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ember.kernels import triton_mla as M  # noqa: E402
from ember.kernels.triton_attention import _decode_merge_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 64)


def _resource_usage(cubin: bytes) -> str:
    """Registers and spill bytes of a compiled kernel (``cuobjdump -res-usage``)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "(no cuobjdump)"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        open(path, "wb").write(cubin)
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (f"regs {regs.group(1) if regs else '?'}, stack {stack.group(1) if stack else '?'} B, "
            f"local {local.group(1) if local else '?'} B")


def _compile(fn, sig: dict, constexprs: dict, num_warps: int, num_stages: int = 3) -> str:
    sig = {name: sig.get(name, "constexpr") for name in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs), target=TARGET,
                       options={"num_warps": num_warps, "num_stages": num_stages})
    return f"shared {k.metadata.shared} B, {_resource_usage(k.asm['cubin'])}"


def main() -> None:
    print("triton", triton.__version__)
    rank, rope, page = 512, 64, 16
    ok = True
    split_sig = {"Q_lat": "*bf16", "Q_pe": "*bf16", "KV": "*bf16", "Mid_O": "*fp32", "Mid_LSE": "*fp32",
                 "block_table": "*i32", "seq_lens": "*i32", "Row_req": "*i32", "Row_lens": "*i32",
                 "sm_scale": "fp32", "stride_lt": "i32", "stride_lh": "i32", "stride_pt": "i32", "stride_ph": "i32",
                 "stride_bt": "i32", "num_heads": "i32"}
    import triton.language as tl
    # The backend's launches (16 heads x 32 keys, 4 warps, 2 stages), then the
    # larger tiles benchmarks/gpu/mla_decode.py --sweep tries.
    configs = [(q, splits, 16, 32, 4, 2) for q in (1, 2, 4, 0) for splits in (1, 4, 32)]
    configs += [(1, 4, 16, 32, 8, 2), (1, 4, 32, 32, 8, 2), (1, 4, 64, 16, 8, 2), (1, 4, 16, 64, 4, 2)]
    for query_len, splits, block_h, block_n, warps, stages in configs:
        name = f"split q={query_len} splits={splits} block_h={block_h} block_n={block_n} warps={warps}"
        ce = dict(RANK=rank, ROPE=rope, BLOCK_R=rank, BLOCK_P=rope, BLOCK_H=block_h, PAGE=page, BLOCK_N=block_n,
                  NUM_SPLITS=splits, QUERY_LEN=query_len, IEEE=False, COMPUTE=tl.bfloat16)
        try:
            print(f"{name}:", _compile(M._mla_split_kernel, split_sig, ce, warps, stages))
        except Exception as e:  # noqa: BLE001 (report every configuration)
            ok = False
            print(f"FAIL {name}:", type(e).__name__, str(e).splitlines()[-1:])
    # float32 (the GPU engine test's dtype): 16-key tiles, IEEE dots.
    f32_sig = {k: ("*fp32" if v == "*bf16" else v) for k, v in split_sig.items()}
    for query_len in (1, 3):
        name = f"split fp32 q={query_len} splits=4 block_h=16 block_n=16 warps=4"
        ce = dict(RANK=rank, ROPE=rope, BLOCK_R=rank, BLOCK_P=rope, BLOCK_H=16, PAGE=page, BLOCK_N=16,
                  NUM_SPLITS=4, QUERY_LEN=query_len, IEEE=True, COMPUTE=tl.float32)
        try:
            print(f"{name}:", _compile(M._mla_split_kernel, f32_sig, ce, 4, 2))
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"FAIL {name}:", type(e).__name__, str(e).splitlines()[-1:])
    merge_sig = {"Mid_O": "*fp32", "Mid_LSE": "*fp32", "Out": "*bf16", "stride_ot": "i32", "stride_oh": "i32",
                 "num_heads": "i32"}
    for splits in (1, 4, 32):
        ce = dict(HEAD_DIM=rank, BLOCK_D=rank, NUM_SPLITS=splits, BLOCK_S=max(2, splits), USE_PDL=False)
        try:
            print(f"merge splits={splits}:", _compile(_decode_merge_kernel, merge_sig, ce, 4))
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"FAIL merge splits={splits}:", type(e).__name__, str(e).splitlines()[-1:])
    store_sig = {"KV_c": "*bf16", "K_pe": "*bf16", "cache": "*bf16", "slot_mapping": "*i64", "stride_c": "i32",
                 "stride_pe": "i32"}
    try:
        print("store:", _compile(M._store_latent_kernel, store_sig,
                                 dict(RANK=rank, ROPE=rope, BLOCK_R=rank, BLOCK_P=rope), 4))
    except Exception as e:  # noqa: BLE001
        ok = False
        print("FAIL store:", type(e).__name__, str(e).splitlines()[-1:])
    print("ALL OK" if ok else "SOME FAILED")


if __name__ == "__main__":
    main()
