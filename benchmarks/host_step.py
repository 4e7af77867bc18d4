"""Host time per engine step (schedule, input packing, update), measured with
a one-layer model of the Llama-3.1-8B preset's layout at toy width, so that the
forward pass costs little and the host path shows: B requests decoding with
500-token prompts, 100 steps.

Usage: python benchmarks/host_step.py B   (e.g. 32 or 256; CPU is enough)
"""

import time, torch, sys
torch.set_num_threads(1)
from ember import LLM, SamplingParams
TINY = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
B = int(sys.argv[1])
llm = LLM("Llama-3.1-8B", load_format="dummy", hf_overrides=TINY, max_model_len=2048, kv_cache_memory=256 << 20,
          max_num_seqs=256)
engine = llm.llm_engine
params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
for i in range(B):
    ids = [(100 + i + j) % 500 for j in range(500)]
    engine.add_request(f"r{i}", ids, params, prompt_token_ids=ids)
while engine.engine_core.scheduler.waiting or any(r.num_output_tokens < 2 for r in engine.engine_core.scheduler.running):
    engine.step()
core = engine.engine_core; runner = core.executor.worker.model_runner; st = core.step_times
s0, u0, p0 = st.schedule_s, st.update_s, runner.prepare_s
N = 100
for _ in range(N):
    engine.step()
print(f"B={B}: host per step: schedule {(st.schedule_s - s0) / N * 1e3:.3f} ms, prepare {(runner.prepare_s - p0) / N * 1e3:.3f} ms, "
      f"update {(st.update_s - u0) / N * 1e3:.3f} ms, sum {((st.schedule_s - s0) + (st.update_s - u0) + (runner.prepare_s - p0)) / N * 1e3:.3f} ms")
