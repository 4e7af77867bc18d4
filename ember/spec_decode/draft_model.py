"""Draft-model proposer: a smaller model with the target's vocabulary proposes
k tokens per request, on the worker, after each step's tokens are known.

KV cache: the draft's layers live in the same paged pool as the target's.
Every block id indexes the target's per-layer cache tensors and the draft's
(:meth:`DraftModelProposer.allocate`), so a block's bytes are the target's
plus the draft's (:meth:`DraftModelProposer.bytes_per_block`) and the
scheduler's block tables, prefix caching, preemption and swapping serve both
models with one allocator. The scheduler reserves k slots past each step's
tokens (``SchedulerConfig.num_lookahead_tokens``) for the proposals' K/V.

Per request the proposer remembers ``draft_len`` (positions ``< draft_len``
hold the draft's K/V of the request's known tokens) and the proposals it fed
the draft after that (their K/V is in the slots that follow). After a step:

1. catch-up: the proposals that the target accepted keep their K/V; the draft
   runs over the remaining known tokens up to and including the step's last
   emitted token (usually 1 or 2 tokens per request, run as decode rounds;
   a prompt or a long gap runs as one packed extend, at most
   ``max_num_batched_tokens`` tokens in a step);
2. propose: the draft's distribution after the last token gives the first
   proposal; k - 1 more single-token decode steps give the rest. The
   proposals stay on the device (a :class:`_ProposalTable`): the step
   returns only their counts, the next step's inputs and verification read
   their ids there (:meth:`DraftModelProposer.draft_source`), and the host
   reads them (for the next catch-up) once that step's verification has
   waited for the device.

Greedy requests take the draft's argmax. Sampled requests draw each proposal
from ``q = softmax(draft logits / temperature)`` and keep ``q`` for the
verifier, which then accepts with ``min(1, p/q)`` and draws rejections from
``normalize(max(p - q, 0))`` (:mod:`ember.sample.rejection_sampler`): the
output is distributed exactly as the target's whatever the draft proposes.
Stale draft K/V (a prefix-cache hit computed while speculation was off, or
slots of rejected proposals) lowers acceptance only, never changes outputs.

Steps with more requests than ``disable_by_batch_size``, or with a
grammar-constrained request, run no draft work at all; the draft catches up
when speculation turns on again.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from ember.layers.attention import AttentionMetadata, ForwardContext, KVCacheSpec
from ember.logger import init_logger
from ember.worker.common import HostCopy, HostInputs, default_dtype, device_inputs, fill_dummy, shifted_slots
from ember.sample.sampler import _mix

if TYPE_CHECKING:
    from ember.core.sched_output import SchedulerOutput
    from ember.spec_decode.config import SpeculativeConfig

logger = init_logger(__name__)

# Without piecewise graphs, catch-ups of at most this many tokens per request
# run as that many decode rounds (CUDA-graph replays) rather than one eager extend.
_MAX_DECODE_ROUNDS = 2
# Piecewise CUDA graphs of the draft cover catch-ups of up to this many tokens.
_PIECEWISE_MAX_TOKENS = 128
# Keeps the draft's sampling noise independent of the verifier's (same seed).
_SEED_SALT = 0x5DEECE66D


class _ProposalTable:
    """One round of proposals: ``table`` [n, width] int64 on the device (row
    ``i``: request ``i``'s proposals, -1 past its count), and its copy to the
    host, started when made and read only when the host needs the ids (the
    next step's catch-up, after that step's verification has waited for the
    device anyway). The next step's inputs and verification read ``table``
    on the device, so scheduling that step never waits for it."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.width = table.shape[1]
        self._host = HostCopy(table)
        self._rows: list[list[int]] | None = None

    def row(self, i: int) -> list[int]:
        """Row ``i`` on the host (waits for the copy the first time)."""
        if self._rows is None:
            self._rows = self._host.tolist()
        return self._rows[i]


@dataclass(slots=True)
class _DraftState:
    """What the proposer remembers of one request (see the module doc)."""

    draft_len: int
    num_fed: int = 0  # the first num_fed of the last proposals were fed at draft_len, draft_len + 1, ...
    table: _ProposalTable | None = None  # the last proposals: row ``row`` of ``table``, ``count`` of them
    row: int = 0
    count: int = 0
    probs: torch.Tensor | None = None  # [count, vocab] float32 q, for sampled proposals

    def proposed(self) -> list[int]:
        """The last proposals, on the host."""
        return [] if self.table is None else self.table.row(self.row)[: self.count]


class _Feed(NamedTuple):
    """One request's draft work after a step: feed ``tokens`` at draft
    positions ``start ..``; ``room`` free slots follow them; ``proposes``:
    the request proposes after them; ``first_row``: the packed row of the
    step's target hidden states at draft position ``start`` (read by
    proposers conditioned on them)."""

    req_id: str
    tokens: list[int]
    start: int
    room: int
    proposes: bool
    first_row: int = -1


class DraftModelProposer:
    """The draft model, its KV cache and its per-request state, next to the
    target in a :class:`~ember.worker.model_runner.ModelRunner`.

    Subclasses change what a draft position feeds (see
    :class:`~ember.spec_decode.hidden_states.HiddenStateProposer`):

    Attributes:
        shift: draft position ``j`` feeds the token at position ``j + shift``
            (0 here; 1 for proposers whose position ``j`` also reads the
            target's hidden state at ``j``, which predicts token ``j + 1``).
        reuses_proposal_kv: the K/V of fed proposals that the target accepts
            is kept (True here: a draft position's K/V depends on its token
            only); False: accepted positions are fed again, with the target's
            hidden states.

    Args:
        runner: the target's model runner (device, block size, request states).
        config: the speculative decoding settings (``draft_model_config`` set).
    """

    shift = 0
    reuses_proposal_kv = True

    def __init__(self, runner: "ModelRunner", config: SpeculativeConfig) -> None:  # noqa: F821 (model_runner imports this module)
        self.runner = runner
        self.config = config
        self.model_config = config.draft_model_config
        self.k = config.num_speculative_tokens
        self.device = runner.device
        self.block_size = runner.block_size
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.host_kv_caches: list[torch.Tensor] = []
        self.states: dict[str, _DraftState] = {}
        self.cuda_graphs = None
        self.piecewise_graphs = None
        self._graph_events: list[torch.cuda.Event] = []  # after the last two draft graph replays
        self.generator = runner.sampler.generator
        self.propose_s = 0.0  # cumulative host wall time in propose (seconds; device time too on CPU)

    # ------------------------------------------------------------- start-up
    def load(self) -> None:
        """Build the draft and load its weights (or dummy ones: the same
        seeded fill as the target's, so a draft of the target's shape gets
        the target's weights).

        Raises:
            ModelLoadError / ValueError: unreadable weights, a missing tensor.
        """
        from ember.layers.fusion import apply_decode_fusions
        from ember.layers.quantization import get_quant_config
        from ember.loader import iter_weights, resolve_model_source

        start = time.perf_counter()
        mc, rc = self.model_config, self.runner.config
        quant_config = get_quant_config(mc.quantization, mc.hf_config)
        with default_dtype(mc.dtype), self.device:
            model = self.model_class()(mc.hf_config, self.runner.attn_backend, quant_config=quant_config)
        if rc.load_config.load_format == "dummy":
            gen = torch.Generator(device=self.device).manual_seed(mc.seed or 0)
            for p in model.parameters():
                fill_dummy(p.data, gen)
        else:
            keep_quantized = quant_config is not None and getattr(quant_config, "raw_checkpoint", False)
            loaded = model.load_weights(iter_weights(resolve_model_source(mc.model), mc.dtype, keep_quantized,
                                                      lazy=True))
            missing = {n for n, _ in model.named_parameters()} - loaded
            if missing:
                raise ValueError(f"draft checkpoint {mc.model} lacks weights for: {sorted(missing)[:8]}")
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        apply_decode_fusions(model, rc.kernel_config, self.device)
        self.model = model.eval()
        num_params = sum(p.numel() for p in model.parameters())
        logger.info(f"loaded draft model {mc.architecture} ({num_params / 1e6:.1f}M parameters, {mc.dtype}) "
                    f"in {time.perf_counter() - start:.1f} s")

    def model_class(self) -> type[torch.nn.Module]:
        """The draft's model class (a target architecture of the registry)."""
        from ember.models.registry import ModelRegistry

        return ModelRegistry.load_class(self.model_config.architecture)

    def aux_hidden_states(self) -> Any:
        """What the target must also write in each forward for this proposer
        (an :class:`~ember.models.utils.AuxHiddenStates`), or None: nothing
        (a draft model reads token ids only)."""
        return None

    def kv_cache_spec(self) -> KVCacheSpec:
        """The draft's per-layer KV layout, in the target's cache dtype."""
        mc = self.model_config
        dtype = self.runner.config.cache_config.kv_cache_torch_dtype(mc.dtype)
        return self.model_class().kv_cache_spec(mc.hf_config, self.block_size, dtype)

    def bytes_per_block(self) -> int:
        """Bytes the draft's layers add to every KV block."""
        return self.kv_cache_spec().bytes_per_block

    def allocate(self, num_blocks: int, device: torch.device | str, pin: bool = False,
                 zero: bool = True) -> list[torch.Tensor]:
        """One draft cache tensor per draft layer with ``num_blocks`` blocks
        (the block ids of the target's pool)."""
        spec = self.kv_cache_spec()
        make = torch.zeros if zero else torch.empty
        return [make(spec.layer_shape(num_blocks), dtype=spec.dtype, device=device, pin_memory=pin)
                for _ in range(spec.num_layers)]

    def block_dim(self) -> int:
        return len(self.kv_cache_spec().leading_shape)

    def capture_cuda_graphs(self) -> None:
        """Capture the draft's decode steps (the proposal loop and one-token
        catch-ups) for batch sizes up to ``disable_by_batch_size``, and with
        ``piecewise_cuda_graphs`` its short catch-ups as piecewise graphs."""
        from ember.layers.attention import Attention
        from ember.layers.attention.mla import MLAAttention
        from ember.worker.cuda_graph import CUDAGraphRunner, PiecewiseCUDAGraphRunner

        modules = list(self.model.modules())
        if not all(getattr(m, "cuda_graph_safe", True) for m in modules):
            logger.info("the draft model has layers that cannot run in CUDA graphs: it runs eager")
            return
        rc = self.runner.config
        limit = self.config.disable_by_batch_size
        max_seqs = rc.scheduler_config.max_num_seqs if limit is None else min(limit, rc.scheduler_config.max_num_seqs)
        config = dataclasses.replace(rc, model_config=self.model_config,
                                     scheduler_config=dataclasses.replace(rc.scheduler_config, max_num_seqs=max_seqs))
        start = time.perf_counter()
        self.cuda_graphs = CUDAGraphRunner(self.model, self.kv_caches, config)
        self.cuda_graphs.capture()
        logger.info(f"captured draft CUDA graphs for decode batch sizes {self.cuda_graphs.sizes[0]}.."
                    f"{self.cuda_graphs.sizes[-1]} in {time.perf_counter() - start:.1f} s")
        if (not self.runner.model_config.piecewise_cuda_graphs or any(isinstance(m, MLAAttention) for m in modules)
                or not any(isinstance(m, Attention) for m in modules)):
            return
        # Catch-ups (a step's accepted drafts and its last token per request) as
        # piecewise graphs, up to a small token count.
        budget = min(_PIECEWISE_MAX_TOKENS, rc.scheduler_config.max_num_batched_tokens)
        config = dataclasses.replace(config, scheduler_config=dataclasses.replace(
            config.scheduler_config, max_num_batched_tokens=budget, max_num_seqs=min(max_seqs, budget)))
        start = time.perf_counter()
        self.piecewise_graphs = PiecewiseCUDAGraphRunner(self.model, self.kv_caches, config)
        self.piecewise_graphs.capture()
        logger.info(f"captured draft piecewise CUDA graphs up to {self.piecewise_graphs.sizes[-1]} tokens "
                    f"in {time.perf_counter() - start:.1f} s")

    # ------------------------------------------------------ request states
    def add_request(self, req_id: str, num_computed_tokens: int) -> None:
        """A request the runner starts tracking: its first ``num_computed_tokens``
        (prefix-cache hits, or a swapped-in request's tokens) count as drafted."""
        self.states[req_id] = _DraftState(num_computed_tokens)

    def forget(self, req_id: str) -> None:
        self.states.pop(req_id, None)

    def active(self) -> bool:
        """Whether to draft after this step: the core proposes only with at
        most ``disable_by_batch_size`` running requests and none constrained
        by a grammar (:class:`~ember.spec_decode.proposer.DraftScheduler`)."""
        requests = self.runner.requests
        limit = self.config.disable_by_batch_size
        return ((limit is None or len(requests) <= limit)
                and not any(s.sampling_params.structured_outputs is not None for s in requests.values()))

    # ---------------------------------------------------------------- step
    @torch.inference_mode()
    def propose(self, sched: SchedulerOutput, host: HostInputs, emitted: dict[str, list[int]],
                hidden: torch.Tensor | None = None) -> dict[str, int]:
        """Catch the draft up on the step's tokens and propose for every
        request that emitted tokens.

        Args:
            sched: the step (its scheduled tokens and drafts).
            host: the step's packed inputs (``req_ids``: its requests).
            emitted: req_id -> the tokens the step emitted (not yet in the
                runner's request states).
            hidden: the step's final hidden states of the target,
                [num_tokens, hidden] in packed order (read by proposers
                conditioned on them; see :meth:`_set_step_features`).
        Returns:
            req_id -> how many tokens it proposed, up to k (fewer where the
            request's block table has no room for their K/V); empty when
            speculation is off. The ids stay on the device
            (:meth:`draft_source`).
        """
        if not self.active():
            return {}
        t0 = time.perf_counter()
        self._set_step_features(host, hidden)
        plan = self._plan_catch_up(sched, host, emitted)
        if not plan:
            return {}
        last_rows, req_ids = self._catch_up(plan)
        if not req_ids:
            self.propose_s += time.perf_counter() - t0
            return {}
        proposals = self._propose(plan, last_rows, req_ids)
        self.propose_s += time.perf_counter() - t0
        return proposals

    def launch_uniform(self, sched: SchedulerOutput, host: HostInputs, verification: Any,
                       hidden: torch.Tensor) -> bool:
        """Launch this step's catch-up and proposals before the host knows
        which drafts stand, where the proposer can (see
        :meth:`~ember.spec_decode.hidden_states.HiddenStateProposer.launch_uniform`);
        returns whether it did (then :meth:`finish_uniform` completes it
        once the emitted tokens are read). Never here: a draft model's
        catch-up depends on how many of its fed proposals were accepted."""
        return False

    def finish_uniform(self, emitted: dict[str, list[int]]) -> dict[str, int]:
        """Complete :meth:`launch_uniform` with the step's emitted tokens."""
        raise NotImplementedError

    def observe(self, sched: SchedulerOutput, host: HostInputs, hidden: torch.Tensor) -> None:
        """A step that samples nothing (prefill chunks only), with the
        target's final hidden states of its packed tokens ([num_tokens,
        hidden]); nothing here (a draft model catches up on known tokens
        later)."""

    # --------------------------------------------- hooks of conditioned proposers
    def _set_step_features(self, host: HostInputs, hidden: torch.Tensor | None) -> None:
        """Remember the step's target features for :meth:`_target_condition`
        (nothing here)."""

    def _first_feedable(self, s: Any) -> int:
        """The first draft position request state ``s`` can be fed at after
        this step (any here: the draft reads token ids only)."""
        return 0

    def _target_condition(self, rows: list[int]) -> torch.Tensor | None:
        """The draft's conditioning input for catch-up positions whose target
        rows (packed rows of the step) are ``rows``; None here."""
        return None

    def _proposal_condition(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The draft's conditioning input for a proposal fed after a draft
        position whose output is ``hidden`` ([n, hidden]); None here."""
        return None

    def _plan_catch_up(self, sched: SchedulerOutput, host: HostInputs, emitted: dict[str, list[int]]
                       ) -> list[_Feed]:
        """Per request with draft work, a :class:`_Feed`: the tokens to feed
        at draft positions ``start ..`` and the free slots after them."""
        runner, bs, shift = self.runner, self.block_size, self.shift
        spec = sched.scheduled_spec_decode_tokens
        budget = runner.config.scheduler_config.max_num_batched_tokens
        pooling = runner._pooling
        qsl = host.query_start_loc.tolist()
        plan = []
        for row, req_id in enumerate(host.req_ids):
            if pooling and req_id in pooling:
                continue
            s, d = runner.requests[req_id], self.states[req_id]
            toks = emitted.get(req_id)
            known = s.token_ids
            if toks:
                end = len(known) + len(toks)
            else:
                end = min(s.num_computed_tokens + sched.num_scheduled_tokens[req_id] - len(spec.get(req_id, ())),
                          len(known))

            def token(i: int) -> int:
                return known[i] if i < len(known) else toks[i - len(known)]

            # Draft positions to feed end before iend (position j feeds token j + shift).
            iend = end - shift if toks else min(end, len(known) - shift)
            # The fed proposals the step accepted keep their K/V.
            fed = d.proposed()[: d.num_fed] if d.num_fed else []
            m = 0
            while m < len(fed) and d.draft_len + m < iend and fed[m] == token(d.draft_len + m + shift):
                m += 1
            d.draft_len += m
            d.num_fed = 0
            # A proposing request feeds at least its last token (its logits give the first proposal).
            start = min(d.draft_len, iend - 1) if toks else d.draft_len
            start = max(start, self._first_feedable(s))
            capacity = len(s.block_ids) * bs
            stop = min(iend, capacity, start + budget)
            if stop <= start:
                continue
            budget -= stop - start
            proposes = bool(toks) and stop == iend
            plan.append(_Feed(req_id, [token(i + shift) for i in range(start, stop)], start, capacity - stop,
                              proposes, qsl[row] + start - s.num_computed_tokens))
        return plan

    def _catch_up(self, plan: list[_Feed]) -> tuple[torch.Tensor, list[str]]:
        """Run the draft over the planned tokens; returns the hidden rows of
        the proposing requests' last tokens ([n, hidden]) and their ids."""
        longest = max(len(p.tokens) for p in plan)
        proposing = [i for i, p in enumerate(plan) if p[4]]
        if longest <= (1 if self.piecewise_graphs is not None else _MAX_DECODE_ROUNDS):
            # Round r feeds the requests with more than longest - r - 1 tokens left; the
            # last round feeds every request its last token.
            hidden = None
            for r in range(longest):
                rows = [i for i, p in enumerate(plan) if len(p[1]) >= longest - r]
                j = [len(plan[i][1]) - (longest - r) for i in rows]
                cond = self._target_condition([plan[i].first_row + jj for i, jj in zip(rows, j)])
                out = self._forward_decode([plan[i][0] for i in rows], [plan[i][1][jj] for i, jj in zip(rows, j)],
                                           [plan[i][2] + jj for i, jj in zip(rows, j)], cond=cond)
                hidden = out
            last = hidden[torch.tensor(proposing, dtype=torch.int64, device=self.device)] if proposing else None
        else:
            order = sorted(range(len(plan)), key=lambda i: len(plan[i][1]) > 1)
            cond = self._target_condition([plan[i].first_row + t for i in order for t in range(len(plan[i].tokens))])
            hidden = self._forward_extend([plan[i] for i in order], cond)
            ends = np.cumsum([len(plan[i][1]) for i in order]) - 1
            row_of = {i: int(e) for i, e in zip(order, ends)}
            rows = torch.tensor([row_of[i] for i in proposing], dtype=torch.int64, device=self.device)
            last = hidden[rows] if proposing else None
        for req_id, toks, start, *_ in plan:
            self.states[req_id].draft_len = start + len(toks)
        return last, [plan[i][0] for i in proposing]

    def _propose(self, plan, last_hidden: torch.Tensor, req_ids: list[str]) -> dict[str, int]:
        """k proposals per request from the draft after its last token (fewer
        where its room ends); returns their counts, the ids stay on the device."""
        info = {p[0]: p for p in plan}
        runner = self.runner
        params = [runner.requests[r].sampling_params for r in req_ids]
        ends = [info[r][2] + len(info[r][1]) for r in req_ids]
        rooms = [info[r][3] for r in req_ids]
        shift = self.shift
        tok, q = self._draw(last_hidden, params, [e + shift for e in ends])
        cols, probs = [tok], [q]
        live = list(range(len(req_ids)))
        out_hidden = last_hidden  # [n, hidden]: each request's last draft output
        for j in range(1, self.k):
            live = [i for i in live if rooms[i] >= j]  # proposal j - 1 is fed at ends[i] + j - 1
            if not live:
                break
            idx = torch.tensor(live, dtype=torch.int64, device=self.device) if len(live) < len(req_ids) else None
            prev = cols[-1] if idx is None else cols[-1][idx]
            cond = self._proposal_condition(out_hidden if idx is None else out_hidden[idx])
            hidden = self._forward_decode([req_ids[i] for i in live], None, [ends[i] + j - 1 for i in live], prev,
                                          cond=cond)
            t, qq = self._draw(hidden, [params[i] for i in live],
                                 [ends[i] + j + shift for i in live])
            if cond is not None and j + 1 < self.k:
                # NOTE: read (copied into the draft's input) before the next replay overwrites it.
                out_hidden = hidden if idx is None else out_hidden.index_copy(0, idx, hidden)
            if idx is not None:  # scatter back to full width (rows that stopped keep -1)
                t = torch.full((len(req_ids),), -1, dtype=torch.int64, device=self.device).index_copy_(0, idx, t)
                if qq is not None:
                    qq = torch.zeros(len(req_ids), qq.shape[1], device=self.device).index_copy_(0, idx, qq)
            cols.append(t)
            probs.append(qq)
        # NOTE: no wait for the device here: the next step is scheduled and
        # launched while these proposals are still being computed.
        table = _ProposalTable(torch.stack(cols, dim=1))  # [n, k'], -1 past a request's room
        out = {}
        for i, req_id in enumerate(req_ids):
            count = min(len(cols), rooms[i] + 1)  # proposal j >= 1 exists where rooms[i] >= j
            d = self.states[req_id]
            d.table, d.row, d.count = table, i, count
            d.num_fed = count - 1 if self.reuses_proposal_kv else 0
            if params[i].greedy or probs[0] is None:
                d.probs = None
            else:
                d.probs = torch.stack([p[i] for p in probs[:count]])
            out[req_id] = count
        return out

    def proposed(self, req_id: str) -> list[int]:
        """``req_id``'s last proposals on the host (waits for their copy from
        the device if it is still running).

        Raises:
            RuntimeError: the request has no proposals here.
        """
        return self._holding(req_id).proposed()

    def _holding(self, req_id: str) -> _DraftState:
        s = self.states.get(req_id)
        if s is None or s.table is None:
            raise RuntimeError(f"{req_id}: verifying proposals the worker does not hold")
        return s

    def draft_source(self, req_ids: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Where the last proposals of ``req_ids`` are on the device: a flat
        int64 tensor and, per request, the index of its first proposal in it.

        Raises:
            RuntimeError: a request has no proposals here.
        """
        tables: dict[int, tuple[_ProposalTable, int]] = {}
        firsts = []
        for req_id in req_ids:
            s = self._holding(req_id)
            t = s.table
            if id(t) not in tables:
                tables[id(t)] = (t, sum(x.table.numel() for x, _ in tables.values()))
            firsts.append(tables[id(t)][1] + s.row * t.width)
        if len(tables) == 1:
            return next(iter(tables.values()))[0].table.view(-1), firsts
        return torch.cat([t.table.view(-1) for t, _ in tables.values()]), firsts

    def _draw(self, hidden: torch.Tensor, params: list, positions: list[int]
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_choose` over the draft's logits of its output rows
        ``hidden`` ([rows, hidden]). When every row is greedy and the draft
        has ``greedy_tokens`` (a head with a vocabulary of its own: its argmax
        mapped to target ids), no target-vocabulary logits are built."""
        if all(p.greedy for p in params) and hasattr(self.model, "greedy_tokens"):
            return self.model.greedy_tokens(hidden), None
        return self._choose(self.model.compute_logits(hidden), params, positions)

    def _choose(self, logits: torch.Tensor, params: list, positions: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per row the draft's token: its argmax for greedy requests, else a
        draw from ``q = softmax(logits / temperature)`` (seeded requests draw
        from a generator seeded by their seed and the position).

        Returns:
            ``(tokens [rows] int64, q [rows, vocab] float32 or None when every row is greedy)``.
        """
        logits = logits.float()
        argmax = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return argmax, None
        temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32,
                             device=self.device)
        q = (logits / temps.unsqueeze(1)).softmax(dim=-1)
        noise = torch.empty_like(q).exponential_(generator=self.generator)
        for i, (p, pos) in enumerate(zip(params, positions)):
            if p.seed is not None and not p.greedy:
                g = torch.Generator(device=self.device).manual_seed(_mix(p.seed ^ _SEED_SALT, pos))
                noise[i].exponential_(generator=g)
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        return torch.where(greedy, argmax, q.div(noise).argmax(dim=-1)), q

    def draft_probs(self, req_ids: list[str], num_drafts: list[int], draft_ids: torch.Tensor, vocab: int
                    ) -> torch.Tensor | None:
        """The q rows for a verification (see
        :func:`~ember.sample.rejection_sampler.rejection_sample`): per request
        ``num_drafts + 1`` rows, its kept distributions (one-hot rows at
        ``draft_ids`` for greedy proposals, zeros on the bonus row); None when
        no request's drafts were sampled (every draft is then a point mass).

        Args:
            draft_ids: [sum(num_drafts + 1)] int64 on the device, the draft
                each row verifies (the request's last proposals; -1 on bonus rows).
        Raises:
            RuntimeError: a request verifies more drafts than it was last proposed.
        """
        kept = []
        for req_id, n in zip(req_ids, num_drafts):
            s = self.states.get(req_id)
            if n and (s is None or n > s.count):
                raise RuntimeError(f"{req_id}: verifying {n} drafts, more than the worker proposed last")
            kept.append(s.probs if n and s.probs is not None else None)
        if all(p is None for p in kept):
            return None
        rows = sum(n + 1 for n in num_drafts)
        q = torch.zeros(rows, vocab, dtype=torch.float32, device=self.device)
        at = 0
        for n, p in zip(num_drafts, kept):
            if p is not None:
                q[at: at + n] = p[:n]
            elif n:
                q[at: at + n].scatter_(1, draft_ids[at: at + n].unsqueeze(1), 1.0)
            at += n + 1
        return q

    # ------------------------------------------------------------- forward
    def _block_table(self, req_ids: list[str]) -> np.ndarray:
        states = [self.runner.requests[r] for r in req_ids]
        table = np.zeros((len(states), max(len(s.block_ids) for s in states)), dtype=np.int32)
        for i, s in enumerate(states):
            table[i, : len(s.block_ids)] = s.block_ids
        return table

    def _forward_decode(self, req_ids: list[str], token_ids: list[int] | None, positions: list[int],
                        device_ids: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                        shift: torch.Tensor | None = None) -> torch.Tensor:
        """One token per request at ``positions`` (its ids from the host, or
        ``device_ids`` [n] int64 on the device), conditioned on ``cond``
        ([n, width], for conditioned drafts); returns [n, hidden]. With
        ``shift`` ([n] int64 on the device) request ``i`` runs at
        ``positions[i] + shift[i]`` instead: its position, slot and sequence
        length are derived on the device (the host does not wait, except
        where an eager attention backend needs host sequence lengths)."""

        n = len(req_ids)
        if cond is not None:
            self.model.set_condition(cond)
        pos = np.array(positions, dtype=np.int64)
        table = self._block_table(req_ids)
        slots = table[np.arange(n), pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        ids = np.zeros(n, dtype=np.int64) if token_ids is None else np.array(token_ids, dtype=np.int64)
        host = HostInputs(ids, pos, slots, np.arange(n + 1, dtype=np.int32), (pos + 1).astype(np.int32), table, 1,
                          [], [], num_decodes=n, req_ids=list(req_ids))
        if device_ids is not None:
            host.in_flight_dst = list(range(n))
            host.in_flight_src = list(range(n))
            host.in_flight_source = device_ids
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(host):
            # NOTE: the graph runner stages inputs in two pinned buffers, in turn, with
            # asynchronous copies; the proposal loop runs ahead of the device, so a
            # buffer is reused only once the replay that read it two runs ago is done.
            if len(self._graph_events) == 2:
                self._graph_events.pop(0).synchronize()
            out = self.cuda_graphs.run(host, shift)
            event = torch.cuda.Event()
            event.record()
            self._graph_events.append(event)
            return out
        return self._run_eager(host, device_ids, shift)

    def _forward_extend(self, plan, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tokens of ``plan`` (single-token requests first), conditioned
        on ``cond`` ([num_tokens, width], for conditioned drafts); returns
        [num_tokens, hidden]."""
        if cond is not None:
            self.model.set_condition(cond)

        req_ids = [p[0] for p in plan]
        counts = np.array([len(p[1]) for p in plan], dtype=np.int64)
        qsl = np.zeros(len(plan) + 1, dtype=np.int64)
        np.cumsum(counts, out=qsl[1:])
        req_of = np.repeat(np.arange(len(plan)), counts)
        starts = np.array([p[2] for p in plan], dtype=np.int64)
        pos = starts[req_of] + np.arange(int(qsl[-1])) - qsl[:-1][req_of]
        table = self._block_table(req_ids)
        slots = table[req_of, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        ids = np.fromiter((t for p in plan for t in p[1]), dtype=np.int64, count=int(qsl[-1]))
        host = HostInputs(ids, pos, slots, qsl.astype(np.int32), (starts + counts).astype(np.int32), table,
                          int(counts.max()), [], [], num_decodes=int((counts == 1).sum()), req_ids=req_ids)
        return self._run_extend(host)

    def _run_extend(self, host: HostInputs) -> torch.Tensor:
        """The draft over the packed tokens of ``host`` (ids still in flight
        taken from ``host.in_flight_source``): its piecewise graphs where they
        fit, else eager; returns [num_tokens, hidden]."""
        if self.piecewise_graphs is not None and self.piecewise_graphs.can_run(host):
            return self.piecewise_graphs.run(host, self)
        return self._run_eager(host, None)

    def _run_eager(self, host: HostInputs, device_ids: torch.Tensor | None,
                   shift: torch.Tensor | None = None) -> torch.Tensor:
        input_ids, positions, meta = self._device_inputs(host)
        if device_ids is not None:
            input_ids = device_ids
        if shift is not None:  # decode rows moved by shift (see _forward_decode)
            positions = positions + shift
            meta.slot_mapping = shifted_slots(positions, meta.block_table, self.block_size)
            meta.seq_lens = (positions + 1).to(torch.int32)
            meta.seq_lens_cpu = (host.seq_lens + shift.cpu().numpy()).tolist()  # (waits; eager only)
            meta.max_seq_len = max(meta.seq_lens_cpu)
        return self.model(input_ids, positions, ForwardContext(meta, self.kv_caches))

    def _device_inputs(self, host: HostInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """``host``'s ids, positions and attention metadata on the device
        (what :class:`~ember.worker.cuda_graph.PiecewiseCUDAGraphRunner` asks its runner for)."""
        return device_inputs(host, self.device)

    def swap_blocks(self, sched: SchedulerOutput, swap: Any) -> None:
        """The draft's share of a step's swaps (``swap(sched, device, host,
        block_dim)`` is the runner's, applied to the draft's caches)."""
        swap(sched, self.kv_caches, self.host_kv_caches, self.block_dim())
