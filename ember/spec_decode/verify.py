"""Verification of a step's draft tokens in the model runner.

The scheduler schedules a request's last token and its k drafts as k + 1
query tokens (an extend over the paged KV cache, like a prefill chunk); the
runner packs them as usual and, for every sampling request, turns its last
``len(drafts) + 1`` hidden rows into logits. Each row gets the sampling
settings of the output position it predicts (penalties and logits processors
see the drafts before it as outputs), the target distribution is applied as
the sampler does, and :mod:`ember.sample.rejection_sampler` decides which
drafts stand (with a draft model's distributions for drafts it sampled). The
emitted tokens are read back before the step returns (a step with drafts is
never followed by a step launched ahead of it): :func:`launch_verification`
enqueues everything, including (on CUDA) the copy of the results to pinned
host memory, and :meth:`Verification.finish` waits for that copy, so a
proposer on the worker can launch its next proposals in between, from the
device results, and the host reads the tokens while they run.

Drafts the worker proposed (``DRAFT_ON_WORKER`` in the schedule) are verified
where they are, on the device (``HostInputs.in_flight_source``); their ids
reach the host only when a row's penalties or processors read its history,
and for the emitted tokens, once the verification's own read-back has
waited for the device.

Rejected drafts' KV entries stay in the blocks: the scheduler takes back
``num_computed_tokens`` so those positions are computed again (overwritten)
next step; the prefix cache hashes only known tokens, never drafts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ember.sample.logprobs import compute_logprobs, unpack_logprobs
from ember.sample.rejection_sampler import draw_noise, emitted_tokens, rejection_sample, target_probs
from ember.sample.sampler import SamplingMetadata
from ember.worker.common import HostCopy, copy_in_flight, to_device

if TYPE_CHECKING:
    from ember.core.sched_output import SchedulerOutput
    from ember.outputs import SampleLogprob


class _Histories(Sequence):
    """Per row, the request's known tokens followed by the drafts before
    that row (the history its penalties and processors see), built only for
    the rows that read it (``drafts(i)``: request ``i``'s drafts on the host)."""

    def __init__(self, drafts: Callable[[int], list[int]]) -> None:
        self.rows: list[tuple[list[int], int, int]] = []
        self.drafts = drafts

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.rows)))]
        known, req, j = self.rows[i]
        return known + self.drafts(req)[:j] if j else known


class Verification:
    """A launched verification (:func:`launch_verification`): its device
    results, readable before anything waits for them, and :meth:`finish`,
    which reads the emitted tokens back.

    Attributes:
        draft_ids: [rows] int64 on the device, the draft each row verifies
            (-1 on a request's last row).
        result: the rejection sampler's per-row ``accepted`` / ``fallback``.
        width: the rows per request when every request has the same number
            of drafts and every row of the step verifies (a uniform step),
            else 0.
    """

    def __init__(self, draft_ids: torch.Tensor, result: Any, width: int,
                 finish: Callable[[], tuple[dict[str, list[int]], dict[str, list[SampleLogprob]]]]) -> None:
        self.draft_ids, self.result, self.width = draft_ids, result, width
        self._finish = finish

    def finish(self) -> tuple[dict[str, list[int]], dict[str, list[SampleLogprob]]]:
        """Wait for the device; returns ``(tokens, logprobs)``: per sampling
        request the emitted tokens (its accepted drafts and one more), and for
        those that ask, one log-probability entry per emitted token."""
        return self._finish()


def launch_verification(runner: Any, sched: SchedulerOutput, host: Any, hidden: torch.Tensor) -> Verification:
    """Sample every sampling request of a step with drafts.

    Args:
        runner: the :class:`~ember.worker.model_runner.ModelRunner` (its
            request states hold the known tokens, not the drafts).
        sched: the step; ``scheduled_spec_decode_tokens`` maps req_id -> drafts.
        host: the packed inputs, a ``model_runner.HostInputs`` (``sample_rows`` is each sampling request's
            last row; its drafts' rows precede it).
        hidden: [num_tokens, hidden] the step's hidden states.
    Returns:
        The launched :class:`Verification` (nothing has waited for the
        device yet).
    """
    spec = sched.scheduled_spec_decode_tokens
    device = runner.device
    req_ids = host.sample_req_ids
    states = [runner.requests[r] for r in req_ids]
    drafts = [list(spec.get(r, ())) for r in req_ids]
    offsets = host.draft_offsets
    resolved: dict[int, list[int]] = {}

    def drafts_on_host(i: int) -> list[int]:
        """Request ``i``'s drafts, a worker's proposals read from its host copy."""
        if req_ids[i] not in offsets:
            return drafts[i]
        if i not in resolved:
            resolved[i] = runner.draft_proposer.proposed(req_ids[i])[: len(drafts[i])]
        return resolved[i]

    rows, params, positions, draft_rows = [], [], [], []
    on_device_dst, on_device_src = [], []
    histories = _Histories(drafts_on_host)
    for i, (req_id, s, d, last) in enumerate(zip(req_ids, states, drafts, host.sample_rows)):
        base = len(s.token_ids) - s.num_prompt_tokens
        if req_id in offsets:
            on_device_dst.extend(range(len(rows), len(rows) + len(d)))
            on_device_src.extend(range(offsets[req_id], offsets[req_id] + len(d)))
        for j in range(len(d) + 1):
            rows.append(last - len(d) + j)
            params.append(s.sampling_params)
            positions.append(base + j)
            histories.rows.append((s.token_ids, i, j))
            draft_rows.append(d[j] if j < len(d) else -1)
    # NOTE: the copies to the device are asynchronous (no wait for the forward
    # pass); a step where every row verifies (a uniform step) needs no gather.
    every_row = len(rows) == hidden.shape[0] and rows[0] == 0 and rows[-1] == len(rows) - 1
    if every_row:
        logits = runner.model.compute_logits(hidden)
    else:
        rows_dev = to_device(np.array(rows, dtype=np.int64), device)
        logits = runner.model.compute_logits(hidden[rows_dev])
    meta = SamplingMetadata.build(params, positions, device, token_ids=histories, vocab_size=logits.shape[-1])
    argmax, probs = target_probs(logits, meta)
    draft_dev = to_device(np.array(draft_rows, dtype=np.int64), device)
    if on_device_dst:
        copy_in_flight(draft_dev, on_device_dst, host.in_flight_source, on_device_src)
    if probs is None:
        result = rejection_sample(draft_dev, argmax, None, None, None, None)
    else:
        uniform, noise = draw_noise(len(rows), probs.shape[-1], meta.seeds, device, runner.sampler.generator)
        proposer = runner.draft_proposer
        q = None if proposer is None else proposer.draft_probs(req_ids, [len(d) for d in drafts], draft_dev,
                                                                probs.shape[-1])
        result = rejection_sample(draft_dev, argmax, probs, meta.temperature == 0, uniform, noise, q)
    width = len(drafts[0]) + 1 if every_row and len({len(d) for d in drafts}) == 1 else 0
    # NOTE: the results' copies start now, so that the read-back waits for
    # the verification only, not for a proposer's passes launched after it.
    copied = (HostCopy(result.accepted), HostCopy(result.fallback))
    return Verification(draft_dev, result, width, lambda: _read_back(runner, host, drafts, drafts_on_host, logits,
                                                                      meta, copied))


def _read_back(runner: Any, host: Any, drafts: list[list[int]], drafts_on_host: Callable[[int], list[int]],
               logits: torch.Tensor, meta: SamplingMetadata, copied: tuple[HostCopy, HostCopy]
               ) -> tuple[dict[str, list[int]], dict[str, list[SampleLogprob]]]:
    """The emitted tokens (and log-probabilities) of a launched verification
    (``copied``: the host copies of its accepted flags and fallback ids)."""
    req_ids, device = host.sample_req_ids, runner.device
    accepted, fallback = copied[0].tolist(), copied[1].tolist()  # waits for the verification
    tokens = emitted_tokens([drafts_on_host(i) for i in range(len(req_ids))], accepted, fallback)
    out = dict(zip(req_ids, tokens))
    logprobs: dict[str, list[SampleLogprob]] = {}
    if meta.logprobs is not None:
        per_row = [t for toks, d in zip(tokens, drafts) for t in toks + [0] * (len(d) + 1 - len(toks))]
        packed = compute_logprobs(logits, torch.tensor(per_row, dtype=torch.int64, device=device), meta.logprobs)
        entries = unpack_logprobs(packed.tolist(), [per_row[i] for i in meta.logprobs.row_ids], meta.logprobs)
        by_row = dict(zip(meta.logprobs.row_ids, entries))
        start = 0
        for req_id, toks, d in zip(host.sample_req_ids, tokens, drafts):
            if start in by_row:
                logprobs[req_id] = [by_row[start + j] for j in range(len(toks))]
            start += len(d) + 1
    return out, logprobs
