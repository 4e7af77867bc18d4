"""The INT8 W8A8 kernels compile for Hopper (sm_90) without a GPU: Triton's
interpreter, which runs the kernels on CPU in the other tests, accepts code
the compiler refuses (e.g. non-constexpr globals, mismatched shapes), so each
kernel variant the wrappers launch is compiled here to a cubin with the
ptxas that Triton ships, in a subprocess without ``TRITON_INTERPRET``."""

import pytest

pytest.importorskip("triton")

from tests.kernels.offline_compile import run_compile_script  # noqa: E402

_SCRIPT = r"""
import itertools, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ember.kernels import triton_int8 as k8

target = GPUTarget("cuda", 90, 32)
out = {}

def comp(tag, fn, sig, const, **options):
    sig = dict(sig, **{k: "constexpr" for k in const})
    out[tag] = triton.compile(ASTSource(fn, sig, constexprs=const), target=target, options=options).metadata.shared

quant = {"X": "*bf16", "XQ": "*i8", "XS": "*fp32", "K": "i32", "stride_xm": "i32", "stride_qm": "i32"}
for static in (False, True):
    comp(f"quant static={static}", k8._per_token_quant_kernel, quant, {"BLOCK_K": 2048, "STATIC": static}, num_warps=4)
gemm = {"A": "*bf16", "W": "*i8", "AS": "*fp32", "WS": "*fp32", "B": "*bf16", "Y": "*bf16", "M": "i32", "N": "i32",
        "K": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_ym": "i32", "stride_as": "i32"}
tiles = {k8.gemm_tiles(m, n) for m in (1, 16, 64, 4096) for n in (4096, 28672)}
for (bm, bn, bk, stages, warps), quant_a, static, even_k in itertools.product(tiles, (True, False), (True, False),
                                                                               (True, False)):
    if quant_a and bm > k8.SKINNY_MAX_M or static and not quant_a:
        continue
    const = {"HAS_BIAS": True, "QUANT_A": quant_a, "STATIC_A": static, "EVEN_K": even_k, "BLOCK_M": bm,
             "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    comp(f"gemm {(bm, bn, bk, stages, warps)} quant_a={quant_a} static={static} even_k={even_k}",
         k8._int8_gemm_kernel, dict(gemm, A="*bf16" if quant_a else "*i8"), const, num_warps=warps,
         num_stages=stages, enable_fp_fusion=False)
epi = {"ACC": "*i32", "AS": "*fp32", "WS": "*fp32", "B": "*bf16", "Y": "*bf16", "M": "i32", "N": "i32",
       "stride_accm": "i32", "stride_ym": "i32", "stride_as": "i32"}
comp("epilogue", k8._scale_epilogue_kernel, epi, {"HAS_BIAS": True, "BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4,
     enable_fp_fusion=False)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    shared = run_compile_script(_SCRIPT)
    # 2 quantization variants, 1 epilogue, 16 GEMM variants (4 tile shapes).
    assert len(shared) == 19, sorted(shared)
    # Hopper's shared memory per block (227 KB).
    assert max(shared.values()) <= 227 * 1024, shared
