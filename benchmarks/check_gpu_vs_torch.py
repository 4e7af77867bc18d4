"""GPU path vs the plain-PyTorch path on the same (seeded dummy) weights, for a
reduced-depth model: prefill logits and greedy tokens.

    python benchmarks/check_gpu_vs_torch.py --model Qwen3-30B-A3B --layers 4

The "torch" run uses the plain-PyTorch attention backend and MoE experts loop,
eager, float32; the GPU run uses the default CUDA path (Triton attention and
fused MoE where the model has them, CUDA graphs where it can be captured) in
float32 as well, so the two should agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from ember import LLM, SamplingParams


def run(model: str, layers: int, backend: str | None, eager: bool, prompts: list[list[int]]):
    llm = LLM(model, load_format="dummy", dtype="float32", hf_overrides={"num_hidden_layers": layers},
              max_model_len=1024, kv_cache_memory=2 << 30, attention_backend=backend, enforce_eager=eager,
              max_num_seqs=16)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    if backend == "torch":  # the plain-PyTorch path: torch attention and the torch experts loop
        from ember.layers.moe.layer import FusedMoE, get_fused_moe_impl

        for module in runner.model.modules():
            if isinstance(module, FusedMoE):
                module.quant_method.impl = get_fused_moe_impl("torch")
    logits = runner.compute_prompt_logits(prompts[0]).float().cpu()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    graphs = runner.cuda_graphs is not None
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return logits, tokens, graphs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (n,), generator=g).tolist() for n in (7, 33, 200, 1)]
    ref_logits, ref_tokens, _ = run(args.model, args.layers, "torch", True, prompts)
    logits, tokens, graphs = run(args.model, args.layers, None, False, prompts)
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    same = sum(a == b for a, b in zip(tokens, ref_tokens))
    result = {"model": args.model, "layers": args.layers, "prefill_logits_rel_err": rel,
              "greedy_prompts_equal": f"{same}/{len(prompts)}", "cuda_graphs": graphs}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
