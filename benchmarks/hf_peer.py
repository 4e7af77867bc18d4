"""HF transformers as the peer, on the same architecture preset with random
bf16 weights: batch-1 decode tokens/s and a static batch's output tokens/s.

Usage (GPU machine): python benchmarks/hf_peer.py --preset Llama-3.1-8B [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="Llama-3.1-8B")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="static batch for the throughput figure")
    ap.add_argument("--batch-len", type=int, default=128, help="input and output length of the batch run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from ember.loader.presets import preset_config, preset_path

    config = preset_config(str(preset_path(args.preset)))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    vocab = config.vocab_size
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(ids: torch.Tensor, n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode():
        ids = torch.randint(100, vocab - 100, (1, args.input_len), device="cuda")
        timed(ids, 8)  # warm-up
        prefill = timed(ids, 1)
        total = timed(ids, args.output_len)
        decode_tps = (args.output_len - 1) / (total - prefill)
        batch = torch.randint(100, vocab - 100, (args.batch, args.batch_len), device="cuda")
        timed(batch[:2], 4)
        t_batch = timed(batch, args.batch_len)
    result = {"peer": f"transformers {__import__('transformers').__version__} generate()", "preset": args.preset,
              "device": torch.cuda.get_device_name(), "batch1_decode_tok_s": decode_tps,
              "batch1_prefill_s": prefill, f"batch{args.batch}_{args.batch_len}x{args.batch_len}_output_tok_s":
              args.batch * args.batch_len / t_batch}
    for k, v in result.items():
        print(f"{k:<40} {v:.4g}" if isinstance(v, float) else f"{k:<40} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
