"""The paged-attention kernels compile for Hopper (sm_90) without a GPU, at
Llama-3.1-8B's head shape in the configurations the wrappers launch, and over
an FP8 cache (V blocks stored transposed) none of them reads the cache from
shared memory a byte at a time: the SASS (``cuobjdump`` from Triton's wheel)
has no ``LDS.U8``. Over a token-major FP8 V the PV operand took 128 of them
per tile and thread; that is what the transposed layout removes. Compiled in a
subprocess (``offline_compile``), with the 16-byte alignment the JIT assumes
for pointers and for integer arguments that are multiples of 16."""

import pytest

pytest.importorskip("triton")

from tests.kernels.offline_compile import run_compile_script  # noqa: E402

_SCRIPT = r"""
import json, os, re, subprocess, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ember.kernels import triton_attention as A

target = GPUTarget("cuda", 90, 64)
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}

def comp(tag, fn, sig, const, aligned, num_warps, num_stages):
    sig = {n: sig.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in aligned}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=target,
                       options={"num_warps": num_warps, "num_stages": num_stages})
    byte_loads = None
    if os.path.exists(tool):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            open(path, "wb").write(k.asm["cubin"])
            sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        byte_loads = len(re.findall(r"\bLDS\.U8\b", sass))
    out[tag] = {"shared": k.metadata.shared, "lds_u8": byte_loads}

heads, group, dim, page = 8, 4, 128, 16
for cache, compute in (("fp8e4nv", tl.float16), ("bf16", tl.bfloat16)):
    fp8 = cache == "fp8e4nv"
    block_n = 128 if fp8 else 64
    layout = dict(V_T=fp8, V_RUN=page)
    common = {"KV": "*" + cache, "block_table": "*i32", "seq_lens": "*i32", "sm_scale": "fp32", "K_scale": "*fp32",
              "V_scale": "*fp32", "stride_qt": "i32", "stride_qh": "i32", "stride_bt": "i32", "num_slots": "i32"}
    split = dict(common, Q="*bf16", Mid_O="*fp32", Mid_LSE="*fp32")
    const = dict(NUM_KV_HEADS=heads, GROUP=group, HEAD_DIM=dim, BLOCK_D=dim, PAGE=page, BLOCK_N=block_n,
                 NUM_SPLITS=8, IEEE=False, COMPUTE=compute, SCALED=True, **layout)
    aligned = ("stride_qt", "stride_qh", "num_slots")
    comp(f"decode {cache}", A._decode_split_kernel, split, dict(const, BLOCK_H=16), aligned, 4, 3)
    comp(f"verify {cache}", A._verify_split_kernel, split, dict(const, QUERY_LEN=4, BLOCK_R=16), aligned, 4, 3)
    ext = dict(common, Q="*bf16", Out="*bf16", query_start_loc="*i32", first_req="i32", stride_ot="i32",
               stride_oh="i32")
    for block_m in (16, 64):
        comp(f"extend {cache} BLOCK_M={block_m}", A._extend_kernel, ext,
             dict(NUM_KV_HEADS=heads, GROUP=group, HEAD_DIM=dim, BLOCK_D=dim, PAGE=page, BLOCK_M=block_m,
                  BLOCK_N=64, IEEE=False, COMPUTE=tl.bfloat16, SCALED=True, V_T=fp8, V_RUN=page),
             aligned + ("stride_ot", "stride_oh"), 8, 2)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_attention_kernels_compile_for_hopper():
    kernels = run_compile_script(_SCRIPT)
    assert len(kernels) == 8, sorted(kernels)
    # Hopper's shared memory per block (227 KB).
    assert max(k["shared"] for k in kernels.values()) <= 227 * 1024, kernels
    fp8 = {tag: k["lds_u8"] for tag, k in kernels.items() if "fp8" in tag}
    if None not in fp8.values():
        assert not any(fp8.values()), f"byte-wise shared-memory loads of an FP8 cache: {fp8}"
