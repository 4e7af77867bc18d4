"""Quality of every quantized execution path on real text: perplexity of the
bundled Qwen2.5-Coder-0.5B-Instruct on ``tests/data/perplexity_text.txt``
(about 3,000 tokens of prose and Python code), run through the engine
(:func:`ember.entrypoints.bench.perplexity.perplexity`: prompt
log-probabilities over sliding windows of 1024 tokens, stride 512), for each
method against the float32 run of the same weights (the GGUF file dequantized
at load).

Bounds on the relative perplexity increase: FP8 +1%, INT8 +2%, W4A16 (AWQ,
GPTQ, group 128) +6%; the GGUF blocks kept quantized are the reference's own
weights, so within 0.1% either way. The AWQ/GPTQ checkpoints are written from
the dequantized weights by the format writers of ``w4a16_checkpoints.py``.

The FP8 KV cache (calibrated scales) misses the +1% of an FP8 path: the loss is
e4m3's on this 0.5B model's keys and values. Its test holds Ember to an
independent reference instead, HF transformers with the same rounding and the
same scales (``kv_fp8_hf_ref.py``), and the loss to +4%.

Every row must pass: a method that is not registered fails its row. Run with
``-s`` to see the table (method, ppl, change, CPU and wall seconds).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from ember.entrypoints.bench.perplexity import PerplexityResult, perplexity

pytestmark = pytest.mark.slow

TEXT = Path(__file__).parents[2] / "data" / "perplexity_text.txt"
CONTEXT_LENGTH = 1024
STRIDE = 512
KV_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class Row:
    """One method: engine options, or a writer of a checkpoint in its format
    (a function of ``w4a16_checkpoints.py``); ``max_increase`` bounds
    ``ppl / baseline_ppl - 1`` (and its absolute value when ``two_sided``)."""

    name: str
    max_increase: float
    engine: dict[str, Any] = field(default_factory=dict)
    checkpoint_writer: str | None = None
    writer_kwargs: dict[str, Any] = field(default_factory=dict)
    two_sided: bool = False
    quantizes_weights: bool = True


ROWS = [
    Row("int8_weight_only", 0.02, {"quantization": "int8_weight_only"}),
    Row("fp8", 0.01, {"quantization": "fp8"}),
    Row("w8a8_int8", 0.02, {"quantization": "w8a8_int8"}),
    Row("awq", 0.06, checkpoint_writer="write_awq_checkpoint"),
    # NOTE: the writers round to nearest (no GPTQ error correction); symmetric
    # 4-bit rounding measured +7.5% here, asymmetric (zero points) stays near AWQ's.
    Row("gptq", 0.06, checkpoint_writer="write_gptq_checkpoint", writer_kwargs={"sym": False}),
    Row("gguf", 0.001, {"quantization": "gguf"}, two_sided=True),
]


@dataclass
class Measured:
    result: PerplexityResult
    weight_bytes: int
    weight_dtypes: set[torch.dtype]
    kv_dtype: torch.dtype
    kv_scales: list[tuple[float, float]]
    cpu_s: float
    wall_s: float


def _measure(model: str, token_ids: list[int], tokenizer: str, **engine: Any) -> Measured:
    """Build the engine (float32), measure, and free it. CPU seconds count
    every thread of this process, from engine construction (load included)."""
    from ember import LLM
    from tests.models.tiny import runner_of

    cpu, wall = time.process_time(), time.perf_counter()
    llm = LLM(model, dtype="float32", tokenizer=tokenizer, max_model_len=CONTEXT_LENGTH + 1,
              kv_cache_memory=KV_CACHE_BYTES, **engine)
    runner = runner_of(llm)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    weight_dtypes = {p.dtype for p in runner.model.parameters()}
    kv_dtype = runner.kv_caches[0].dtype
    result = perplexity(llm, token_ids, CONTEXT_LENGTH, STRIDE)
    kv_scales = [(float(m.k_scale), float(m.v_scale)) for m in runner.model.modules() if hasattr(m, "k_scale")]
    measured = Measured(result, weight_bytes, weight_dtypes, kv_dtype, kv_scales, time.process_time() - cpu,
                        time.perf_counter() - wall)
    del llm, runner
    gc.collect()
    return measured


@pytest.fixture(scope="module")
def token_ids(qwen_path) -> list[int]:
    from ember.loader import load_tokenizer_for

    ids = load_tokenizer_for(qwen_path).encode(TEXT.read_text(encoding="utf-8"))
    assert 2500 <= len(ids) <= 4000, len(ids)
    return ids


@pytest.fixture(scope="module")
def table():
    """Rows of (method, ppl, change from float32 or None, CPU s, wall s), printed
    at the end of the module."""
    rows: list[tuple[str, float, float | None, float, float]] = []
    yield rows
    print(f"\nperplexity, {TEXT.name}, context {CONTEXT_LENGTH}, stride {STRIDE}, float32 activations")
    print(f"{'method':<18} {'ppl':>8} {'change':>8} {'cpu_s':>7} {'wall_s':>7}")
    for name, ppl, delta, cpu_s, wall_s in rows:
        change = "" if delta is None else f"{delta * 100:+.2f}%"
        print(f"{name:<18} {ppl:8.4f} {change:>8} {cpu_s:7.1f} {wall_s:7.1f}")


@pytest.fixture(scope="module")
def baseline(qwen_path, token_ids, table) -> Measured:
    m = _measure(qwen_path, token_ids, qwen_path)
    table.append(("float32 (reference)", m.result.ppl, None, m.cpu_s, m.wall_s))
    # The reference must be unquantized: every weight float32.
    assert m.weight_dtypes == {torch.float32} and m.kv_dtype == torch.float32, (m.weight_dtypes, m.kv_dtype)
    assert m.result.tokens_evaluated == len(token_ids) - 1
    # A trained model on ordinary text: far from uniform (ln |vocab| ~ 11.9 nats).
    assert 1.5 < m.result.ppl < 30, m.result.ppl
    return m


def _write_checkpoint(writer_name: str, gguf_path: str, out: Path, **kwargs: Any) -> str:
    """The bundled model's dequantized float32 weights, written by
    ``w4a16_checkpoints.<writer_name>`` (group size 128, ``kwargs``) into ``out``."""
    from ember.loader import iter_weights, read_hf_config, resolve_model_source
    from tests.layers.quantization import w4a16_checkpoints

    source = resolve_model_source(gguf_path)
    weights = dict(iter_weights(source, torch.float32))
    getattr(w4a16_checkpoints, writer_name)(weights, read_hf_config(source), out, group_size=128, **kwargs)
    del weights
    gc.collect()
    return str(out)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_perplexity_within_bound(row: Row, qwen_path, token_ids, baseline, table, tmp_path) -> None:
    model = qwen_path
    if row.checkpoint_writer is not None:
        model = _write_checkpoint(row.checkpoint_writer, qwen_path, tmp_path / row.name, **row.writer_kwargs)
    m = _measure(model, token_ids, qwen_path, **row.engine)
    delta = m.result.ppl / baseline.result.ppl - 1
    table.append((row.name, m.result.ppl, delta, m.cpu_s, m.wall_s))
    print(f"{row.name}: ppl {m.result.ppl:.4f} ({delta * 100:+.2f}% from {baseline.result.ppl:.4f}), "
          f"{m.cpu_s:.0f} CPU s")
    assert m.result.tokens_evaluated == baseline.result.tokens_evaluated
    if row.quantizes_weights:
        # The method really stores its weights quantized (the embedding and
        # LM head may stay float32).
        assert m.weight_bytes < 0.9 * baseline.weight_bytes, (m.weight_bytes, baseline.weight_bytes)
    else:
        assert m.kv_dtype == torch.float8_e4m3fn and m.weight_bytes == baseline.weight_bytes
    bound = f"{row.name}: perplexity {m.result.ppl:.4f} vs {baseline.result.ppl:.4f} float32 ({delta * 100:+.2f}%)"
    assert delta <= row.max_increase, f"{bound}, above +{row.max_increase * 100:g}%"
    if row.two_sided:
        assert abs(delta) <= row.max_increase, f"{bound}, outside +-{row.max_increase * 100:g}%"


# The FP8 KV cache's loss is the format's on this small model, and it depends on the
# CPU's float32 rounding, which e4m3 amplifies: with calibrated scales +2.82% (one CPU)
# and +3.15% (another, AVX2), with scales of 1 +3.51% and +3.85%, Ember and HF alike.
# The same amplification separates Ember from the HF reference with the same scales:
# within 0.25% on AMD EPYC (Zen 3, AVX2) and on an Intel Xeon (AVX-512) with two torch
# threads, 0.37% on that Xeon with one (as under pytest-xdist); 0.5% bounds that and
# stays below the ~0.7% between calibrated scales and scales of 1.
KV_FP8_MAX_INCREASE = 0.04
KV_FP8_MAX_REFERENCE_GAP = 0.005


def test_fp8_kv_cache_matches_hf_rounding_reference(qwen_path, token_ids, baseline, table) -> None:
    """``--kv-cache-dtype fp8 --calculate-kv-scales``: Ember's perplexity equals
    HF transformers' with each layer's keys and values rounded to e4m3 with the
    scales Ember calibrated (``kv_fp8_hf_ref.py``) within 0.5%, and the loss
    against float32 is within the format's +4% on this model."""
    from tests.layers.quantization.kv_fp8_hf_ref import hf_perplexity
    from tests.models.tiny import load_hf_gguf

    m = _measure(qwen_path, token_ids, qwen_path, kv_cache_dtype="fp8", calculate_kv_scales=True)
    assert m.kv_dtype == torch.float8_e4m3fn and m.weight_bytes == baseline.weight_bytes
    assert len(m.kv_scales) == 24 and all(k != 1.0 and v != 1.0 for k, v in m.kv_scales), m.kv_scales
    delta = m.result.ppl / baseline.result.ppl - 1
    table.append(("kv_cache_fp8", m.result.ppl, delta, m.cpu_s, m.wall_s))

    cpu, wall = time.process_time(), time.perf_counter()
    hf = load_hf_gguf(qwen_path)
    ref_ppl = hf_perplexity(hf, token_ids, CONTEXT_LENGTH, STRIDE, kv_scales=m.kv_scales)
    table.append(("  HF, same scales", ref_ppl, ref_ppl / baseline.result.ppl - 1, time.process_time() - cpu,
                  time.perf_counter() - wall))
    del hf
    gc.collect()

    gap = m.result.ppl / ref_ppl - 1
    assert abs(gap) <= KV_FP8_MAX_REFERENCE_GAP, f"Ember {m.result.ppl:.4f} vs HF reference {ref_ppl:.4f}"
    assert delta <= KV_FP8_MAX_INCREASE, (f"kv_cache_fp8: perplexity {m.result.ppl:.4f} vs "
                                          f"{baseline.result.ppl:.4f} float32 ({delta * 100:+.2f}%)")
