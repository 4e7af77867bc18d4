"""The KV pool is sized from the memory the loaded weights really take
(the CUDA allocator's peak after loading and a profiling forward), not from
parameter counts x the model dtype: a weight-quantized 8B preset gets the
memory its int8 weights free as KV blocks. GPU only."""

from __future__ import annotations

import gc

import pytest
import torch

from ember import LLM

pytestmark = pytest.mark.gpu


def _pool(**kwargs) -> tuple[int, int, int]:
    """(KV blocks, bytes per block, bytes of the weights as stored) of the 8B preset with dummy weights."""
    # Engines of earlier tests in this process may sit in reference cycles, their
    # device memory still allocated (which the pool's sizing counts as in use).
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM("Llama-3.1-8B", load_format="dummy", enforce_eager=True, max_model_len=2048,
              max_num_batched_tokens=256, memory_utilization=0.6, **kwargs)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    stored = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    out = llm.llm_engine.engine_core.num_gpu_blocks, runner.kv_cache_bytes_per_block(), stored
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return out


def test_int8_weights_free_their_bytes_for_kv_blocks():
    blocks, per_block, bf16_bytes = _pool()
    int8_blocks, int8_per_block, int8_bytes = _pool(quantization="int8_weight_only")
    assert per_block == int8_per_block
    saved = bf16_bytes - int8_bytes
    assert saved > 6e9  # about half of the linear layers' 14 GB
    # The int8 path's forward widens one weight at a time (float32 + bf16
    # copies of the largest, 4096 x 28672): its activation peak is up to ~1 GB higher.
    gained = (int8_blocks - blocks) * per_block
    assert saved - 1.2e9 < gained < saved + 0.1e9, (saved, gained)
