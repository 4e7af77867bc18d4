"""Multi-token-prediction (MTP) proposer: the target checkpoint's own MTP
layer (DeepSeek-V3 / R1, :mod:`ember.models.deepseek_mtp`) proposes k tokens
per request from the target's final hidden states.

MTP position ``i`` reads the target's hidden state ``h_i`` and the token
``t_{i+1}`` and predicts ``t_{i+2}``; its layer keeps its own MLA cache in
the target's paged pool (every block id also indexes the MTP's cache tensor,
as a draft model's layers do, see :mod:`ember.spec_decode.draft_model`).

After every step the MTP runs over the positions the target computed in that
step whose next token is known: the prompt tokens of a prefill chunk, the
tokens the step emitted (a verified step: the accepted drafts and the bonus
token, whose target rows are exactly the kept ones). Each position's MTP
input is then final: nothing is recomputed later, and the MTP K/V of
rejected proposals is overwritten by the next step's. The output at the
last emitted token gives the first proposal; proposals 2..k apply the layer
again at the following positions, fed its own output hidden state and its
previous proposal (DeepSeek-V3 Technical Report, section 2.2; one layer used
at every depth).

Positions the MTP never saw (computed while speculation was off, in a step
scheduled ahead, or taken from the prefix cache) keep stale MTP K/V: that
lowers acceptance only. Verification keeps the output exact whatever is
proposed (:mod:`ember.spec_decode.verify`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ember.layers.attention import ForwardContext, KVCacheSpec
from ember.logger import init_logger
from ember.spec_decode.draft_model import DraftModelProposer, _DraftState
from ember.worker.common import HostInputs, default_dtype, fill_dummy

if TYPE_CHECKING:
    from ember.core.sched_output import SchedulerOutput
    from ember.spec_decode.config import SpeculativeConfig

logger = init_logger(__name__)


class MTPProposer(DraftModelProposer):
    """The MTP module, its KV cache and its per-request proposals, next to
    the target in a :class:`~ember.worker.model_runner.ModelRunner`. Cache
    allocation, swapping, proposal sampling (argmax for greedy requests, a
    draw from ``q`` kept for the verifier otherwise) and :meth:`draft_probs`
    are the draft model's.

    Args:
        runner: the target's model runner (device, block size, request states, model config).
        config: the speculative decoding settings (method ``"mtp"``).
    """

    def __init__(self, runner: "ModelRunner", config: SpeculativeConfig) -> None:  # noqa: F821
        super().__init__(runner, config)
        self.model_config = runner.model_config

    # ------------------------------------------------------------- start-up
    def load(self) -> None:
        """Build the MTP module and load its weights from the target
        checkpoint (or dummy ones).

        Raises:
            ModelLoadError / ValueError: unreadable weights, a missing MTP tensor.
        """
        from ember.layers.quantization import get_quant_config
        from ember.loader import iter_weights, resolve_model_source
        from ember.models.registry import ModelRegistry

        start = time.perf_counter()
        mc, rc = self.model_config, self.runner.config
        quant_config = get_quant_config(mc.quantization, mc.hf_config)
        with default_dtype(mc.dtype), self.device:
            model = ModelRegistry.load_mtp_class(mc.architecture)(mc.hf_config, self.runner.attn_backend,
                                                                   quant_config=quant_config)
        if rc.load_config.load_format == "dummy":
            gen = torch.Generator(device=self.device).manual_seed((mc.seed or 0) + 1)
            for p in model.parameters():
                fill_dummy(p.data, gen)
        else:
            keep_quantized = quant_config is not None and getattr(quant_config, "raw_checkpoint", False)
            loaded = model.load_weights(iter_weights(resolve_model_source(mc.model), mc.dtype, keep_quantized))
            missing = {n for n, _ in model.named_parameters()} - loaded
            if missing:
                raise ValueError(f"{mc.model} lacks the MTP layer's weights (speculative_config method 'mtp'): "
                                 f"{sorted(missing)[:8]}")
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        self.model = model.eval()
        num_params = sum(p.numel() for p in model.parameters())
        logger.info(f"loaded the MTP layer of {mc.architecture} ({num_params / 1e6:.1f}M parameters) "
                    f"in {time.perf_counter() - start:.1f} s")

    def kv_cache_spec(self) -> KVCacheSpec:
        """The MTP layer's KV layout, in the target's cache dtype."""
        from ember.models.registry import ModelRegistry

        mc = self.model_config
        dtype = self.runner.config.cache_config.kv_cache_torch_dtype(mc.dtype)
        return ModelRegistry.load_mtp_class(mc.architecture).kv_cache_spec(mc.hf_config, self.block_size, dtype)

    def capture_cuda_graphs(self) -> None:
        """The MTP step runs eagerly (its inputs include the target's hidden states)."""

    def add_request(self, req_id: str, num_computed_tokens: int) -> None:
        self.states[req_id] = _DraftState(num_computed_tokens)

    # ---------------------------------------------------------------- step
    @torch.inference_mode()
    def observe(self, sched: SchedulerOutput, host: HostInputs, hidden: torch.Tensor) -> None:
        """A step that samples nothing (prefill chunks only): run the MTP over
        its positions, so that their MTP K/V is there when the requests decode."""
        if self.active():
            self.propose(sched, host, {}, hidden)

    @torch.inference_mode()
    def propose(self, sched: SchedulerOutput, host: HostInputs, emitted: dict[str, list[int]],
                hidden: torch.Tensor | None = None) -> dict[str, list[int]]:
        """Run the MTP over the step's positions (see the module docstring)
        and propose for every request that emitted tokens.

        Args:
            sched: the step.
            host: the step's packed inputs (its ``req_ids``, ``positions`` and
                ``query_start_loc`` locate each request's rows).
            emitted: req_id -> the tokens the step emitted (not yet in the
                runner's request states).
            hidden: [num_tokens, hidden] the target's final hidden states of
                the step's packed tokens.
        Returns:
            req_id -> up to k proposals (fewer where the request's block table
            has no room for their K/V); empty when speculation is off.
        """
        if hidden is None or not self.active():
            return {}
        t0 = time.perf_counter()
        plan = self._plan(host, emitted)
        proposals = self._run(plan, hidden) if plan else {}
        self.propose_s += time.perf_counter() - t0
        return proposals

    def _plan(self, host: HostInputs, emitted: dict[str, list[int]]
              ) -> list[tuple[str, int, list[int], int, int, bool]]:
        """Per request with MTP work: ``(req_id, start, next_tokens, first_row,
        room, proposes)``: positions ``start ..`` get ``next_tokens`` (each
        position's ``t_{i+1}``) and the target rows ``first_row ..``; ``room``
        free slots follow them."""
        runner, bs = self.runner, self.block_size
        pooling = runner._pooling
        qsl = host.query_start_loc
        plan = []
        for r, req_id in enumerate(host.req_ids):
            if pooling and req_id in pooling:
                continue
            s = runner.requests[req_id]
            known, toks = s.token_ids, emitted.get(req_id, ())
            first, n = int(qsl[r]), int(qsl[r + 1] - qsl[r])
            start = int(host.positions[first])
            # Position i needs t_{i+1}: a known token or one the step emitted.
            count = min(n, len(known) + len(toks) - 1 - start)
            capacity = len(s.block_ids) * bs
            count = min(count, capacity - start)
            if count <= 0:
                continue
            nxt = [known[i] if i < len(known) else toks[i - len(known)] for i in range(start + 1, start + 1 + count)]
            proposes = bool(toks) and start + count == len(known) + len(toks) - 1
            plan.append((req_id, start, nxt, first, capacity - start - count, proposes))
        plan.sort(key=lambda p: len(p[2]) > 1)  # one-token requests first (the attention backends' decodes)
        return plan

    def _run(self, plan, hidden: torch.Tensor) -> dict[str, list[int]]:
        """The MTP over the planned positions, then k proposals per proposing request."""
        dev = self.device
        counts = np.array([len(p[2]) for p in plan], dtype=np.int64)
        qsl = np.zeros(len(plan) + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        req_of = np.repeat(np.arange(len(plan)), counts)
        offset = np.arange(int(qsl[-1])) - qsl[:-1][req_of]
        starts = np.array([p[1] for p in plan], dtype=np.int64)
        rows = np.array([p[3] for p in plan], dtype=np.int64)[req_of] + offset
        pos = starts[req_of] + offset
        ids = np.fromiter((t for p in plan for t in p[2]), dtype=np.int64, count=int(qsl[-1]))
        req_ids = [p[0] for p in plan]
        table = self._block_table(req_ids)
        slots = table[req_of, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        host = HostInputs(ids, pos, slots, qsl.astype(np.int32), (starts + counts).astype(np.int32), table,
                          int(counts.max()), [], [], num_decodes=int((counts == 1).sum()), req_ids=req_ids)
        prev = hidden[torch.from_numpy(rows).to(dev, non_blocking=True)]
        out = self._forward(host, None, prev)
        proposing = [i for i, p in enumerate(plan) if p[5]]
        if not proposing:
            return {}
        last = torch.tensor([int(qsl[i + 1]) - 1 for i in proposing], dtype=torch.int64, device=dev)
        return self._propose_from(plan, proposing, out[last])

    def _propose_from(self, plan, proposing: list[int], last_hidden: torch.Tensor) -> dict[str, list[int]]:
        """k proposals per request from the MTP outputs at their last emitted tokens."""
        runner = self.runner
        req_ids = [plan[i][0] for i in proposing]
        params = [runner.requests[r].sampling_params for r in req_ids]
        ends = [plan[i][1] + len(plan[i][2]) for i in proposing]  # the position proposal 1 is fed at
        rooms = [plan[i][4] for i in proposing]
        tok, q = self._choose(self.model.compute_logits(last_hidden), params, [e + 1 for e in ends])
        cols, probs = [tok], [q]
        live = list(range(len(req_ids)))
        prev = last_hidden
        for j in range(1, self.k):
            keep = [i for i in range(len(live)) if rooms[live[i]] >= j]  # proposal j is fed at ends + j - 1
            if not keep:
                break
            if len(keep) < len(live):
                idx = torch.tensor(keep, dtype=torch.int64, device=self.device)
                prev = prev[idx]
                live = [live[i] for i in keep]
            full = torch.tensor(live, dtype=torch.int64, device=self.device) if len(live) < len(req_ids) else None
            fed = cols[-1] if full is None else cols[-1][full]
            pos = np.array([ends[i] + j - 1 for i in live], dtype=np.int64)
            host = self._decode_inputs([req_ids[i] for i in live], pos)
            prev = self._forward(host, fed, prev)
            t, qq = self._choose(self.model.compute_logits(prev), [params[i] for i in live],
                                 [ends[i] + j + 1 for i in live])
            if full is not None:  # scatter back to full width (rows that stopped keep -1)
                t = torch.full((len(req_ids),), -1, dtype=torch.int64, device=self.device).index_copy_(0, full, t)
                if qq is not None:
                    qq = torch.zeros(len(req_ids), qq.shape[1], device=self.device).index_copy_(0, full, qq)
            cols.append(t)
            probs.append(qq)
        table = torch.stack(cols, dim=1).tolist()  # [n, k'] (waits for the device)
        out = {}
        for i, req_id in enumerate(req_ids):
            row = [t for t in table[i] if t >= 0]
            d = self.states[req_id]
            d.proposed = row
            d.probs = None if params[i].greedy or probs[0] is None else torch.stack([p[i] for p in probs[: len(row)]])
            out[req_id] = row
        return out

    def _decode_inputs(self, req_ids: list[str], pos: np.ndarray) -> HostInputs:
        n = len(req_ids)
        table = self._block_table(req_ids)
        slots = table[np.arange(n), pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        return HostInputs(np.zeros(n, dtype=np.int64), pos, slots, np.arange(n + 1, dtype=np.int32),
                          (pos + 1).astype(np.int32), table, 1, [], [], num_decodes=n, req_ids=list(req_ids))

    def _forward(self, host: HostInputs, device_ids: torch.Tensor | None, previous_hidden: torch.Tensor
                 ) -> torch.Tensor:
        input_ids, positions, meta = self._device_inputs(host)
        if device_ids is not None:
            input_ids = device_ids
        return self.model(input_ids, positions, ForwardContext(meta, self.kv_caches), previous_hidden)
