"""Independent FP8 references for the expert tests: absmax quantization of
weights (128 x 128-style blocks or one scale per row) and activations (per
token, in groups, or static), dequantization, and a per-token float32 loop
over SwiGLU experts."""

import torch
import torch.nn.functional as F

FP8_MAX = 448.0


def routing(num_tokens, num_experts, top_k, gen, device):
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    w, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def quantize_blocks(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] float -> FP8 and block scales [E, ceil(N / bn), ceil(K / bk)] (absmax / 448 per block)."""
    e, n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    blocks = F.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n)).view(e, nb, bn, kb, bk)
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, :, None, :, None]).view(e, nb * bn, kb * bk)[:, :n, :k].to(torch.float8_e4m3fn)
    return q.contiguous(), scale


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] float -> FP8 and per-row scales [E, N]."""
    scale = w.float().abs().amax(dim=2).clamp(min=1e-12) / FP8_MAX
    return (w.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def dequant(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    if block is None:
        return q.float() * scale[..., None]
    bn, bk = block
    n, k = q.shape[-2:]
    return q.float() * scale.repeat_interleave(bn, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :k]


def fake_quant(x: torch.Tensor, group: int | None, static: torch.Tensor | None = None) -> torch.Tensor:
    """Activations quantized to FP8 and back (float32), one scale per token and group."""
    rows, cols = x.shape
    out = torch.empty(rows, cols, device=x.device)
    group = group or cols
    for g0 in range(0, cols, group):
        part = x[:, g0:g0 + group].float()
        s = static.float() if static is not None else part.abs().amax(1, keepdim=True).clamp(min=1e-10) / FP8_MAX
        out[:, g0:g0 + group] = (part / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s
    return out


def reference(x, w13, w2, weights, ids, group, a13=None, a2=None):
    """Per-token loop in float32 over dequantized experts ``w13`` [E, 2I, H], ``w2`` [E, H, I]."""
    inter = w2.shape[-1]
    xq = fake_quant(x, group, a13)
    out = torch.zeros(x.shape, device=x.device)
    for t in range(x.shape[0]):
        for k, e in enumerate(ids[t].tolist()):
            gu = xq[t:t + 1] @ w13[e].T
            h = fake_quant(F.silu(gu[:, :inter]) * gu[:, inter:], group, a2)
            out[t] += weights[t, k] * (h @ w2[e].T)[0]
    return out
