"""The FP8 decode fusions' linear layers at Llama-3.1-8B's shapes: a decoder
layer's FP8 projections with the RMSNorms folded into the W8A16 GEMV and the
residual adds in its epilogue (:mod:`ember.layers.fusion` with
``--quantization fp8``) against the unfused sequence that ``--no-fold-norm``
runs (the add+RMSNorm kernel, then the GEMV), each checked against float32.

Per M (rows of a decode step, default 1, 4, 16), µs per call from CUDA-graph
replays over enough weight copies to exceed L2 (weights from HBM, PDL on as
decode launches them), for

- each fused projection against its unfused form: qkv (6144 x 4096) and
  gate_up (28672 x 4096, SwiGLU) with the norm folded vs the norm kernel + the
  GEMV; o (4096 x 4096) and down (4096 x 14336) with the residual in the
  epilogue vs the GEMV alone (the add then runs inside the next norm kernel);
- a whole layer's linear part (attention replaced by a fixed tensor): unfused
  ``norm, qkv, o, norm, gate_up, down`` vs fused ``qkv+norm, o+res,
  gate_up+norm, down+res``, and that difference times 32 layers (one 8B decode
  step);

and each fused output's error against a float32 reference (the normalized
rows rounded as the norm kernel rounds them, times the dequantized weight:
max |error| / max |reference|, should be below 1e-2), plus the fused layer's
stream against the unfused one's. Writes every figure to ``--json``. About a
minute on one H100 (mostly compiling).

    python3 benchmarks/gpu/fp8_fused_decode.py [--m 1 4 16] [--json results/fp8_fused_decode.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from fp8_gemv_sweep import time_us  # (this folder) one CUDA-graph timer
from ember.kernels.triton_fp8 import fp8_skinny_linear
from ember.kernels.triton_ops import rms_norm
from ember.layers.quantization.fp8_linear import quantize_fp8_per_channel

DEVICE = "cuda"
BF16 = torch.bfloat16
HIDDEN, QKV, INTER = 4096, 6144, 14336
EPS = 1e-5
L2_BYTES = 60 << 20  # more than an H100's (50 MB) or H200's L2




def fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8_per_channel(torch.randn(n, k, device=DEVICE) * 0.02)


def norm_ref(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """RMSNorm in float32, rounded as the norm kernel rounds."""
    xf = x.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return (h.float() * g.float()).to(x.dtype)


def gemv_ref(x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor], gated: bool = False,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ (w[0].float() * w[1][:, None]).T
    if gated:
        d = y.shape[1] // 2
        gate = y[:, :d].to(x.dtype).float()
        y = (gate / (1 + torch.exp(-gate))).to(x.dtype) * y[:, d:].to(x.dtype)
    y = y.to(x.dtype)
    if residual is not None:
        y = (y.float() + residual.float()).to(x.dtype)
    return y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def layer_weights() -> dict:
    return {"qkv": fp8_weight(QKV, HIDDEN), "o": fp8_weight(HIDDEN, HIDDEN), "gate_up": fp8_weight(2 * INTER, HIDDEN),
            "down": fp8_weight(HIDDEN, INTER), "g1": (torch.rand(HIDDEN, device=DEVICE) + 0.5).to(BF16),
            "g2": (torch.rand(HIDDEN, device=DEVICE) + 0.5).to(BF16)}


def lin(x, w, **kw):
    return fp8_skinny_linear(x, w[0], w[1], use_pdl=True, **kw)


def unfused_layer(w: dict, h: torch.Tensor, res: torch.Tensor, attn: torch.Tensor):
    """``--no-fold-norm``: (block output, residual) -> (block output, residual)."""
    x, s = rms_norm(h, w["g1"], EPS, res)
    lin(x, w["qkv"])
    o = lin(attn, w["o"])
    x, s = rms_norm(o, w["g2"], EPS, s)
    return lin(lin(x, w["gate_up"], gated=True), w["down"]), s


def fused_layer(w: dict, s: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The fused layer: stream -> stream."""
    lin(s, w["qkv"], norm=(w["g1"], EPS))
    s = lin(attn, w["o"], residual=s)
    act = lin(s, w["gate_up"], gated=True, norm=(w["g2"], EPS))
    return lin(act, w["down"], residual=s)


def run(m: int, layers: list[dict], out: dict) -> None:
    copies = len(layers)
    torch.manual_seed(m)
    h = torch.randn(m, HIDDEN, device=DEVICE, dtype=BF16)
    res = torch.randn(m, HIDDEN, device=DEVICE, dtype=BF16)
    s = (h.float() + res.float()).to(BF16)
    attn = torch.randn(m, HIDDEN, device=DEVICE, dtype=BF16)
    act_in = torch.randn(m, INTER, device=DEVICE, dtype=BF16) * 0.1
    w0 = layers[0]
    row = {}
    # Correctness of the fused forms against float32.
    row["err_qkv_norm"] = rel_err(lin(s, w0["qkv"], norm=(w0["g1"], EPS)), gemv_ref(norm_ref(s, w0["g1"]), w0["qkv"]))
    row["err_gate_up_norm"] = rel_err(lin(s, w0["gate_up"], gated=True, norm=(w0["g2"], EPS)),
                                      gemv_ref(norm_ref(s, w0["g2"]), w0["gate_up"], gated=True))
    row["err_o_res"] = rel_err(lin(attn, w0["o"], residual=s), gemv_ref(attn, w0["o"], residual=s))
    row["err_down_res"] = rel_err(lin(act_in, w0["down"], residual=s), gemv_ref(act_in, w0["down"], residual=s))
    d, s_unfused = unfused_layer(w0, h, res, attn)
    stream_unfused = (d.float() + s_unfused.float()).to(BF16)
    row["err_layer_vs_unfused"] = rel_err(fused_layer(w0, s, attn), stream_unfused)
    # Per projection.
    row["qkv_unfused_us"] = time_us(lambda i: lin(rms_norm(s, layers[i]["g1"], EPS), layers[i]["qkv"]), copies)
    row["qkv_gemv_us"] = time_us(lambda i: lin(s, layers[i]["qkv"]), copies)
    row["qkv_fused_us"] = time_us(lambda i: lin(s, layers[i]["qkv"], norm=(layers[i]["g1"], EPS)), copies)
    row["gate_up_unfused_us"] = time_us(
        lambda i: lin(rms_norm(s, layers[i]["g2"], EPS), layers[i]["gate_up"], gated=True), copies)
    row["gate_up_gemv_us"] = time_us(lambda i: lin(s, layers[i]["gate_up"], gated=True), copies)
    row["gate_up_fused_us"] = time_us(
        lambda i: lin(s, layers[i]["gate_up"], gated=True, norm=(layers[i]["g2"], EPS)), copies)
    row["o_gemv_us"] = time_us(lambda i: lin(attn, layers[i]["o"]), copies)
    row["o_fused_us"] = time_us(lambda i: lin(attn, layers[i]["o"], residual=s), copies)
    row["down_gemv_us"] = time_us(lambda i: lin(act_in, layers[i]["down"]), copies)
    row["down_fused_us"] = time_us(lambda i: lin(act_in, layers[i]["down"], residual=s), copies)
    # Whole layers.
    row["layer_unfused_us"] = time_us(lambda i: unfused_layer(layers[i], h, res, attn), copies)
    row["layer_fused_us"] = time_us(lambda i: fused_layer(layers[i], s, attn), copies)
    row["step_saving_us_32_layers"] = 32 * (row["layer_unfused_us"] - row["layer_fused_us"])
    out[str(m)] = row
    print(f"M={m:2d}  qkv: norm+GEMV {row['qkv_unfused_us']:6.1f}  GEMV {row['qkv_gemv_us']:6.1f}  "
          f"fused {row['qkv_fused_us']:6.1f} | gate_up: norm+GEMV {row['gate_up_unfused_us']:6.1f}  "
          f"GEMV {row['gate_up_gemv_us']:6.1f}  fused {row['gate_up_fused_us']:6.1f} | o: {row['o_gemv_us']:5.1f} "
          f"+res {row['o_fused_us']:5.1f} | down: {row['down_gemv_us']:5.1f} +res {row['down_fused_us']:5.1f}  (µs)")
    print(f"      layer: unfused {row['layer_unfused_us']:6.1f}  fused {row['layer_fused_us']:6.1f} µs  "
          f"-> {row['step_saving_us_32_layers']:+7.1f} µs per 32-layer step | errors: qkv+norm "
          f"{row['err_qkv_norm']:.1e} gate_up+norm {row['err_gate_up_norm']:.1e} o+res {row['err_o_res']:.1e} "
          f"down+res {row['err_down_res']:.1e} layer vs unfused {row['err_layer_vs_unfused']:.1e}")
    bad = [k for k, v in row.items() if k.startswith("err") and not v < 1e-2]
    if bad:
        print(f"      WRONG: {bad} above 1e-2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--json", default="results/fp8_fused_decode.json")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    layer_bytes = QKV * HIDDEN + HIDDEN * HIDDEN + 2 * INTER * HIDDEN + HIDDEN * INTER
    layers = [layer_weights() for _ in range(max(2, math.ceil(L2_BYTES / layer_bytes)))]
    out: dict = {}
    for m in args.m:
        run(m, layers, out)
    if args.json:
        import os

        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
