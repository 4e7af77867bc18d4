"""Independent reference for the FP8 KV cache's perplexity: HF transformers'
Qwen2 with the bundled Qwen2.5-Coder-0.5B-Instruct's weights (the GGUF file
dequantized, float32), keys (after RoPE) and values rounded to
``float8_e4m3fn`` with a scale of 1, the windows of ``ember bench perplexity``
(1024 tokens, stride 512) over ``tests/data/perplexity_text.txt``. Prints the
float32 and FP8-KV perplexities and the change, to compare with
``ember bench perplexity --dtype float32 --kv-cache-dtype fp8``.

    python benchmarks/perplexity_kv_fp8_hf.py        # CPU, about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import transformers.models.qwen2.modeling_qwen2 as qwen2
from transformers import Qwen2ForCausalLM

from ember.entrypoints.bench.perplexity import sliding_windows
from ember.loader import iter_weights, load_tokenizer_for, read_hf_config, resolve_model_source
from ember.loader.download import ensure_bundled_model

TEXT = Path(__file__).parents[1] / "tests" / "data" / "perplexity_text.txt"


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def _ppl(model: Qwen2ForCausalLM, ids: list[int], context_length: int, stride: int) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in sliding_windows(len(ids), context_length, stride):
            logprobs = model(input_ids=torch.tensor([ids[w.begin: w.end]])).logits[0].float().log_softmax(-1)
            for t in range(w.first_scored, w.end):
                total -= float(logprobs[t - w.begin - 1, ids[t]])
                count += 1
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    args = ap.parse_args()
    path = ensure_bundled_model("Qwen2.5-Coder-0.5B-Instruct")
    source = resolve_model_source(path)
    model = Qwen2ForCausalLM(read_hf_config(source)).float().eval()
    model.load_state_dict(dict(iter_weights(source, torch.float32)), strict=True)
    ids = load_tokenizer_for(path).encode(TEXT.read_text(encoding="utf-8"))
    base = _ppl(model, ids, args.context_length, args.stride)

    rope = qwen2.apply_rotary_pos_emb

    def rope_then_round_k(q, k, *rest, **kwargs):
        q, k = rope(q, k, *rest, **kwargs)
        return q, _fp8_round(k)

    qwen2.apply_rotary_pos_emb = rope_then_round_k
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, out: _fp8_round(out))
             for layer in model.model.layers]
    try:
        fp8 = _ppl(model, ids, args.context_length, args.stride)
    finally:
        qwen2.apply_rotary_pos_emb = rope
        for h in hooks:
            h.remove()
    print(f"tokens {len(ids)}, context {args.context_length}, stride {args.stride}")
    print(f"float32           ppl {base:.4f}")
    print(f"FP8 K/V (scale 1) ppl {fp8:.4f} ({(fp8 / base - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
