"""Independent reference for the FP8 KV cache's perplexity: HF transformers'
Qwen2 with the bundled Qwen2.5-Coder-0.5B-Instruct's weights (the GGUF file
dequantized, float32), keys (after RoPE) and values rounded to
``float8_e4m3fn`` with a scale of 1, the windows of ``ember bench perplexity``
(1024 tokens, stride 512) over ``tests/data/perplexity_text.txt``. Prints the
float32 and FP8-KV perplexities and the change, to compare with
``ember bench perplexity --dtype float32 --kv-cache-dtype fp8``. (With
calibrated scales the same comparison is
``tests/layers/quantization/test_perplexity.py``'s FP8 KV cache test.)

    python benchmarks/perplexity_kv_fp8_hf.py        # CPU, about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ember.loader import load_tokenizer_for  # noqa: E402
from ember.loader.download import ensure_bundled_model  # noqa: E402
from tests.layers.quantization.kv_fp8_hf_ref import hf_perplexity  # noqa: E402
from tests.models.tiny import load_hf_gguf  # noqa: E402

TEXT = ROOT / "tests" / "data" / "perplexity_text.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    args = ap.parse_args()
    path = ensure_bundled_model("Qwen2.5-Coder-0.5B-Instruct")
    model = load_hf_gguf(path)
    ids = load_tokenizer_for(path).encode(TEXT.read_text(encoding="utf-8"))
    base = hf_perplexity(model, ids, args.context_length, args.stride)
    fp8 = hf_perplexity(model, ids, args.context_length, args.stride,
                        kv_scales=[(1.0, 1.0)] * len(model.model.layers))
    print(f"tokens {len(ids)}, context {args.context_length}, stride {args.stride}")
    print(f"float32           ppl {base:.4f}")
    print(f"FP8 K/V (scale 1) ppl {fp8:.4f} ({(fp8 / base - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
