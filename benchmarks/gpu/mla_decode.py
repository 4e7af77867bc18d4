"""The absorbed-MLA decode kernel (``ember.kernels.triton_mla``) at
DeepSeek-V3's dimensions (kv_lora_rank 512, rope 64; 128 heads = TP 1, 16 =
TP 8), bfloat16, block size 16:

1. checks it against a float32 PyTorch reference (decode rows and 4-row
   verification requests, a padding row), printing the max abs error;
2. times it (CUDA graph of the kernel pair, median of replays) for batch 1,
   32, 64 x context 128..4096, with the split count the backend picks, next
   to the bytes bound (latent rows read once per head tile at 3.35 TB/s
   would be the floor; the printed ``GB/s`` counts each row once) and the
   plain-PyTorch absorbed form (``TorchMLABackend._decode_absorbed``'s math);
3. with ``--sweep``, times each (block_h, block_n, num_warps, num_stages)
   candidate at a few points.

    python benchmarks/gpu/mla_decode.py [--heads 128 16] [--sweep]
Prints one line per point; ``--json PATH`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/: graph_timing

from ember.kernels.triton_mla import mla_decode_attention, mla_num_splits  # noqa: E402
from graph_timing import graph_time_us  # noqa: E402

RANK, ROPE, PAGE = 512, 64, 16


def make(batch: int, ctx: int, heads: int, q_len: int = 1, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = -(-ctx // PAGE)
    cache = torch.randn(batch * blocks + 1, PAGE, RANK + ROPE, device="cuda", generator=g).bfloat16()
    table = torch.randperm(batch * blocks, device="cuda", generator=g).view(batch, blocks).int()
    q_lat = (torch.randn(batch * q_len, heads, RANK, device="cuda", generator=g) * 0.05).bfloat16()
    q_pe = (torch.randn(batch * q_len, heads, ROPE, device="cuda", generator=g) * 0.05).bfloat16()
    return q_lat, q_pe, cache, table


def reference(q_lat, q_pe, cache, table, seq_lens: list[int], q_len: int, scale: float) -> torch.Tensor:
    """float32, request by request, rows causal among a request's q_len rows."""
    out = torch.zeros(q_lat.shape, dtype=torch.float32, device="cuda")
    q = torch.cat([q_lat, q_pe], -1).float()
    for r, n in enumerate(seq_lens):
        if n == 0:
            continue
        lat = cache[table[r, : -(-n // PAGE)].long()].view(-1, RANK + ROPE)[:n].float()
        for j in range(q_len):
            t, keys = r * q_len + j, n - q_len + j + 1
            p = torch.softmax(q[t] @ lat[:keys].T * scale, -1)
            out[t] = p @ lat[:keys, :RANK]
    return out


def check(heads: int, sms: int) -> float:
    worst = 0.0
    for q_len in (1, 4):
        seq_lens = [1, 129, 700, 0, 2050, 4096]
        q_lat, q_pe, cache, table = make(len(seq_lens), max(seq_lens), heads, q_len)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        scale = 192 ** -0.5
        out = torch.empty_like(q_lat)
        splits = mla_num_splits(len(seq_lens) * q_len, heads, sms)
        mla_decode_attention(q_lat, q_pe, cache, out, table, lens, scale, splits, query_len=q_len)
        ref = reference(q_lat, q_pe, cache, table, seq_lens, q_len, scale)
        err = (out.float() - ref).abs().max().item()
        print(json.dumps({"check": "mla_decode", "heads": heads, "q_len": q_len, "splits": splits,
                          "max_abs_err": err, "ok": err < 2e-2}))
        worst = max(worst, err)
    return worst


def torch_absorbed(q_lat, q_pe, cache, table, lens, scale):
    """The plain-PyTorch absorbed decode (TorchMLABackend's math, one row per request)."""
    b = table.shape[0]
    lat = cache[table.long()].view(b, -1, RANK + ROPE)
    q = torch.cat([q_lat, q_pe], -1)
    s = torch.einsum("bhd,bld->bhl", q, lat).float() * scale
    pad = torch.arange(lat.shape[1], device="cuda")[None, :] >= lens[:, None]
    p = s.masked_fill(pad[:, None, :], float("-inf")).softmax(-1).to(q.dtype)
    return torch.einsum("bhl,blr->bhr", p, lat[..., :RANK])


def time_point(batch: int, ctx: int, heads: int, sms: int, **launch) -> dict:
    q_lat, q_pe, cache, table = make(batch, ctx, heads)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q_lat)
    splits = mla_num_splits(batch, heads, sms, launch.get("block_h", 16))
    scale = 192 ** -0.5
    us = graph_time_us(lambda _: mla_decode_attention(q_lat, q_pe, cache, out, table, lens, scale, splits, **launch), 1)
    row_bytes = batch * ctx * (RANK + ROPE) * 2
    rec = {"batch": batch, "ctx": ctx, "heads": heads, "splits": splits, **launch, "triton_us": round(us, 1),
           "latent_gb_s": round(row_bytes / us / 1e3, 1)}
    if not launch:
        rec["torch_us"] = round(graph_time_us(lambda _: torch_absorbed(q_lat, q_pe, cache, table, lens, scale), 1), 1)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, nargs="+", default=[128, 16])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(0), "SMs", sms)
    recs = []
    for h in args.heads:
        check(h, sms)
    for h in args.heads:
        for b in args.batch_sizes:
            for c in args.contexts:
                recs.append(time_point(b, c, h, sms))
                print(json.dumps(recs[-1]))
    if args.sweep:  # (block_h, block_n, num_warps, num_stages); the first is the backend's
        configs = [(16, 32, 4, 2), (16, 16, 4, 2), (16, 32, 4, 3), (16, 64, 4, 1), (16, 32, 8, 2), (16, 64, 8, 2),
                   (32, 32, 8, 2), (32, 16, 8, 2), (64, 16, 8, 2)]
        for h in args.heads:
            for b, c in ((1, 4096), (32, 1024), (64, 4096)):
                for block_h, block_n, warps, stages in configs:
                    launch = dict(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages)
                    try:
                        recs.append(time_point(b, c, h, sms, **launch))
                    except Exception as e:  # noqa: BLE001 (out of shared memory, etc.)
                        print(json.dumps({"batch": b, "ctx": c, "heads": h, **launch, "error": type(e).__name__}))
                        continue
                    print(json.dumps(recs[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
