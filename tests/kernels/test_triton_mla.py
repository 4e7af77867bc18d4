"""The absorbed-MLA decode kernel (``mla_decode_attention``) and the latent
write (``store_latent_cache``) against plain-PyTorch float32 references: on
CPU in Triton's interpreter at small shapes, on CUDA at DeepSeek-V3's
dimensions (128 heads, kv_lora_rank 512, rope 64)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.interpret import DEVICE, ON_GPU, synchronize

pytest.importorskip("triton")


def reference(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
              row_req: list[int], row_lens: list[int], scale: float) -> torch.Tensor:
    """float32 absorbed MLA row by row: the row's first ``n`` cached latents
    gathered slot by slot through its request's block table; scores
    ``[q_lat | q_pe] . [c_kv | k_pe]`` times ``scale``, values ``c_kv``. Rows
    with no keys give zeros."""
    rank = q_lat.shape[-1]
    block_size = kv_cache.shape[1]
    cache, table = kv_cache.float().cpu(), block_table.cpu()
    q = torch.cat([q_lat.float().cpu(), q_pe.float().cpu()], dim=-1)  # [rows, heads, rank + rope]
    out = torch.zeros(q_lat.shape, dtype=torch.float32)
    for t, (r, n) in enumerate(zip(row_req, row_lens)):
        if n == 0:
            continue
        lat = torch.stack([cache[int(table[r, p // block_size]), p % block_size] for p in range(n)])
        probs = torch.softmax((q[t] @ lat.T) * scale, dim=-1)  # [heads, n]
        out[t] = probs @ lat[:, :rank]
    return out


def _case(seq_lens: list[int], num_rows: int, num_heads: int, rank: int, rope: int, block_size: int,
          dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 2
    kv = torch.randn(num_blocks, block_size, rank + rope, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros(len(seq_lens), max(max(blocks), 1) + 1, dtype=torch.int32)  # a spare column
    for r, nb in enumerate(blocks):
        table[r, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
    q_lat = torch.randn(num_rows, num_heads, rank, generator=g) * 0.3
    q_pe = torch.randn(num_rows, num_heads, rope, generator=g) * 0.3
    return (q_lat.to(dtype).to(DEVICE), q_pe.to(dtype).to(DEVICE), kv.to(dtype).to(DEVICE), table.to(DEVICE))


def _check(seq_lens, query_len, num_heads, rank, rope, block_size=16, num_splits=1, dtype=torch.float32,
           seed=0, tol=1e-4, row_indexed=False, **launch):
    """Requests of ``seq_lens`` keys with ``query_len`` new rows each (causal
    among them), through the uniform-rows mode or, with ``row_indexed``, the
    same rows given as explicit (request, key count) lists."""
    from ember.kernels.triton_mla import mla_decode_attention

    num_rows = len(seq_lens) * query_len
    q_lat, q_pe, kv, table = _case(seq_lens, num_rows, num_heads, rank, rope, block_size, dtype, seed)
    row_req = [t // query_len for t in range(num_rows)]
    row_lens = [max(seq_lens[t // query_len] - query_len + t % query_len + 1, 0) for t in range(num_rows)]
    scale = (rank + rope) ** -0.5
    out = torch.full((num_rows, num_heads, rank), float("nan"), dtype=dtype, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    if row_indexed:
        mla_decode_attention(q_lat, q_pe, kv, out, table, lens, scale, num_splits, query_len=0,
                             row_req=torch.tensor(row_req, dtype=torch.int32, device=DEVICE),
                             row_lens=torch.tensor(row_lens, dtype=torch.int32, device=DEVICE), **launch)
    else:
        mla_decode_attention(q_lat, q_pe, kv, out, table, lens, scale, num_splits, query_len=query_len, **launch)
    synchronize()
    ref = reference(q_lat, q_pe, kv, table, row_req, row_lens, scale)
    assert not out.isnan().any(), "unwritten or NaN output"
    err = (out.float().cpu() - ref).abs().max().item()
    assert err < tol, f"max abs error {err:.3e}"


# Lengths cross block (16) and split boundaries; 0 is a CUDA-graph padding row.
@pytest.mark.parametrize("num_splits", [1, 3, 4])
def test_decode_rows(num_splits):
    _check([1, 17, 40, 0, 33], query_len=1, num_heads=4, rank=32, rope=16, num_splits=num_splits)


def test_decode_rows_non_power_of_two_dims():
    """DeepSeek's tiny test models have kv_lora_rank 24 and rope 8: masked tiles."""
    _check([5, 16, 29], query_len=1, num_heads=3, rank=24, rope=8, num_splits=2)


@pytest.mark.parametrize("row_indexed", [False, True])
def test_verification_rows(row_indexed):
    """Three new rows per request, causal among them; a padding request of 0
    keys; a request whose whole context is its new rows."""
    _check([20, 3, 0, 35], query_len=3, num_heads=4, rank=32, rope=16, num_splits=2, row_indexed=row_indexed)


def test_head_tiles():
    """More heads than one tile (two 16-head tiles, the second partly masked)."""
    _check([9, 18], query_len=1, num_heads=20, rank=32, rope=16, num_splits=2, block_h=16)


def test_bfloat16():
    _check([7, 30], query_len=2, num_heads=4, rank=64, rope=16, num_splits=2, dtype=torch.bfloat16, tol=3e-2)


def test_store_latent_cache_skips_padding_slots():
    from ember.kernels.triton_mla import store_latent_cache

    g = torch.Generator().manual_seed(0)
    rank, rope = 24, 8
    cache = torch.zeros(3, 4, rank + rope, device=DEVICE)
    proj = torch.randn(3, rank + rope + 5, generator=g).to(DEVICE)  # strided views of one projection
    kv_c, k_pe = proj[:, :rank], proj[:, rank + 5:]
    slots = torch.tensor([5, -1, 0], dtype=torch.int64, device=DEVICE)
    store_latent_cache(kv_c, k_pe, cache, slots)
    synchronize()
    want = torch.zeros(12, rank + rope)
    want[5] = torch.cat([kv_c[0], k_pe[0]]).cpu()
    want[0] = torch.cat([kv_c[2], k_pe[2]]).cpu()
    assert torch.equal(cache.view(12, -1).cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads", [16, 128])
@pytest.mark.parametrize("query_len", [1, 4])
def test_deepseek_dims_gpu(num_heads, query_len):
    """DeepSeek-V3's MLA dims (TP 8 and TP 1 heads) in bfloat16, with the
    split count the backend picks."""
    from ember.kernels.triton_mla import mla_num_splits

    seq_lens = [1, 129, 700, 0, 2050, 64]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = mla_num_splits(len(seq_lens) * query_len, num_heads, sms)
    _check(seq_lens, query_len, num_heads, 512, 64, block_size=16, num_splits=splits, dtype=torch.bfloat16,
           tol=2e-2)


@pytest.mark.skipif(ON_GPU, reason="the float32 check runs on CPU; GPU runs the bfloat16 one")
def test_float32_many_splits():
    _check([50], query_len=1, num_heads=2, rank=16, rope=16, num_splits=8, block_n=16)
