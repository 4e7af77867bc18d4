"""Proposers conditioned on the target's hidden states (EAGLE-3 heads; the
same machinery serves other heads that read the target's hidden states, such
as multi-token-prediction layers).

Such a draft model's position ``j`` reads two inputs: the token at ``j + 1``
and a conditioning vector. At a catch-up position the vector comes from the
target's forward at position ``j`` (whose hidden state predicted token
``j + 1``): the residual stream at the depths the head asks for
(:class:`~ember.models.utils.AuxHiddenStates`, written by the target's
forward into a buffer of fixed address, so inside its CUDA graphs too), or,
for heads that ask for no depth, the target's final normed hidden state. At
a later proposal it is the head's own output at the position before. So the
draft's position ``j`` holds token ``j + 1`` (``shift = 1``); the first
proposal comes from the position of the step's last known token but one.

Everything else is :class:`~ember.spec_decode.draft_model.DraftModelProposer`'s:
the head's K/V in the shared paged pool, lookahead slots, catch-up rounds or
one packed extend, the k - 1 proposal steps, CUDA graphs (the head reads its
conditioning from a buffer of its own, :meth:`set_condition`), greedy
argmax or sampling from ``q`` kept for the verifier. Differences: the target's
hidden states exist only for the positions a step computed, so the head is
fed after every step, a step that samples nothing (prefill chunks only)
included (:meth:`HiddenStateProposer.observe`): a prompt's positions are all
fed whatever its chunking, each once, by the step that computed it (the last
chunk's by the step that samples the first token, which also proposes).
Positions before a step's first are never fed (a head that fell behind, e.g.
while speculation was off or in a step scheduled ahead, or positions taken
from the prefix cache that the head saw with another next token, keeps stale
K/V there: lower acceptance, same outputs); and accepted proposals are fed
again with the target's hidden states (their K/V from the head's own hidden
state is not kept).

In a uniform step (every request verifies k drafts and greedy decodes, the
shape of steady-state decoding) the head's work is launched before the host
reads which drafts stand (:meth:`HiddenStateProposer.launch_uniform`): the
catch-up feeds all k + 1 verified positions at the step's own slots, the
first proposal reads the row of the last emitted token, and the later
proposals' positions and slots are derived on the device from the accepted
counts. So the device runs the head right after verification while the host
reads back, schedules and stages the next step. Other steps plan the
catch-up on the host from the emitted tokens, as above; both give the same
proposals.

A head model class provides (see :class:`~ember.models.llama_eagle3.Eagle3LlamaForCausalLM`):

- ``cls(hf_config, attn_backend, quant_config=None)``, ``kv_cache_spec``,
  ``load_weights``, as target models;
- ``target_layers(target_hf_config) -> tuple[int, ...] | None``: the depths
  of the target's residual stream it reads, or None for the target's final
  normed hidden state;
- ``bind_target(target_model)``: share what the head takes from the target
  (e.g. the token embedding when the checkpoint has none);
- ``allocate_condition(max_tokens)``; ``condition_target(features) -> [n, width]``
  (the target's features of catch-up positions to the head's conditioning
  input); ``set_condition(x)`` (copy ``x`` [n, width] into the head's input
  buffer, read by the next forward of n tokens);
- ``forward(input_ids, positions, ctx) -> [n, hidden]`` (the state a next
  proposal is conditioned on) and ``compute_logits(hidden) -> [n, vocab]``
  float32 over the target's vocabulary.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import TYPE_CHECKING, Any

import torch

from ember.spec_decode.draft_model import DraftModelProposer, _ProposalTable
from ember.worker.common import HostInputs

if TYPE_CHECKING:
    from ember.core.sched_output import SchedulerOutput

# Head architectures (config ``architectures``) -> (module, class).
HEAD_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLMEagle3": ("ember.models.llama_eagle3", "Eagle3LlamaForCausalLM"),
    "Eagle3LlamaForCausalLM": ("ember.models.llama_eagle3", "Eagle3LlamaForCausalLM"),
}


def head_class(architecture: str) -> type[torch.nn.Module]:
    """The model class of a head architecture.

    Raises:
        KeyError: not a head architecture.
    """
    module, name = HEAD_ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module), name)


class HiddenStateProposer(DraftModelProposer):
    """A head conditioned on the target's hidden states, next to the target
    in a :class:`~ember.worker.model_runner.ModelRunner` (see the module doc).

    Args:
        runner: the target's model runner.
        config: the speculative decoding settings (``draft_model_config``:
            the head's, with a head architecture).
    """

    shift = 1
    reuses_proposal_kv = False
    # Uniform steps launch the head's work before the emitted tokens are read (launch_uniform).
    uniform_launch = True

    def __init__(self, runner: Any, config: Any) -> None:
        super().__init__(runner, config)
        self._features: torch.Tensor | None = None  # the step's target features, [num_tokens, width]
        sc = runner.config.scheduler_config
        self.max_tokens = max(sc.max_num_batched_tokens, sc.max_num_seqs)
        self._uniform: tuple | None = None  # what launch_uniform leaves for finish_uniform

    def model_class(self) -> type[torch.nn.Module]:
        return head_class(self.model_config.architecture)

    def load(self) -> None:
        """Build and load the head (:meth:`DraftModelProposer.load`), share the
        target's weights it takes, and allocate its conditioning buffer."""
        super().load()
        self.model.bind_target(self.runner.model)
        self.model.allocate_condition(self.max_tokens)

    def aux_hidden_states(self) -> Any:
        """The depths of the target's residual stream the head reads, as a
        buffer the target's forward writes (None: the head reads the final
        hidden states the target returns anyway)."""
        from ember.models.utils import AuxHiddenStates

        target = self.runner.model_config
        layers = self.model.target_layers(target.hf_config)
        if layers is None:
            return None
        return AuxHiddenStates(layers, self.max_tokens, target.hf_config.hidden_size, target.dtype, self.device)

    @torch.inference_mode()
    def observe(self, sched: SchedulerOutput, host: HostInputs, hidden: torch.Tensor) -> None:
        """A step that samples nothing (prefill chunks only): feed the head
        its positions while the target's hidden states of them exist (this
        step's ``hidden`` [num_tokens, hidden] in packed order, or the depths
        in ``runner.aux_hidden``), so that their K/V is there when the
        requests decode. Nothing while speculation is off."""
        self.propose(sched, host, {}, hidden)

    @torch.inference_mode()
    def launch_uniform(self, sched: SchedulerOutput, host: HostInputs, verification: Any,
                       hidden: torch.Tensor) -> bool:
        """Launch the step's catch-up and k proposals before the host knows
        which drafts stand, for a uniform step (every request verifies k
        drafts in k + 1 rows, and every row is verified) of greedy requests
        whose blocks hold the proposals; returns whether it did.

        The catch-up runs over all k + 1 verified positions ``P .. P + k``
        of each request, at the step's own positions and slots: position
        ``P + j`` is fed the token the verification emits at row ``j``
        (the draft where it stood, else the row's fallback) with the
        target's features of row ``j``. The first ``a`` positions (``a``:
        the request's emitted tokens) are what the host-planned catch-up
        feeds; the K/V written past them is overwritten by the proposals
        and the next step before any attention reads it. The first
        proposal comes from row ``a - 1``; proposal ``j`` runs at position
        ``P + a - 1 + j``, derived on the device from the accepted counts.
        """
        k, width = self.k, verification.width
        if not self.uniform_launch or width != k + 1 or host.req_ids != host.sample_req_ids or not self.active():
            return False
        runner, bs = self.runner, self.block_size
        if runner._pooling:
            return False
        states = [runner.requests[r] for r in host.req_ids]
        params = [s.sampling_params for s in states]
        first = host.positions[::width]
        # Proposal k - 1 runs at position P + 2k - 1 at most (every draft accepted).
        if not all(p.greedy for p in params) or any(len(s.block_ids) * bs < int(p) + 2 * k
                                                        for s, p in zip(states, first)):
            return False
        t0 = time.perf_counter()
        n, dev = len(states), self.device
        result = verification.result
        accepted = result.accepted.view(n, width).to(torch.int64).cumprod(dim=1).sum(dim=1)  # [n] drafts that stand
        feed = torch.where(torch.arange(width, device=dev) < accepted.unsqueeze(1),
                           verification.draft_ids.view(n, width), result.fallback.view(n, width))
        self._set_step_features(host, hidden)
        self.model.set_condition(self.model.condition_target(self._features[: n * width]))
        rows = list(range(n * width))
        catch_up = dataclasses.replace(host, in_flight_dst=rows, in_flight_src=rows, in_flight_source=feed.view(-1),
                                       draft_offsets={})
        out = self._run_extend(catch_up)
        last = out.view(n, width, -1)[torch.arange(n, device=dev), accepted]  # [n, hidden]
        req_ids = list(host.req_ids)
        cols = [self._draw(last, params, [0] * n)[0]]
        out_hidden = last
        for j in range(1, k):
            hidden_j = self._forward_decode(req_ids, None, (first + j).tolist(), cols[-1],
                                            cond=self._proposal_condition(out_hidden), shift=accepted)
            cols.append(self._draw(hidden_j, params, [0] * n)[0])
            out_hidden = hidden_j
        self._uniform = (_ProposalTable(torch.stack(cols, dim=1)), req_ids, first.tolist())
        self.propose_s += time.perf_counter() - t0
        return True

    def finish_uniform(self, emitted: dict[str, list[int]]) -> dict[str, int]:
        """The request states after :meth:`launch_uniform`, once the step's
        emitted tokens are known: positions ``< P + a`` hold the head's K/V
        of known tokens, and k proposals wait in the table."""
        table, req_ids, first = self._uniform
        self._uniform = None
        for i, (req_id, p) in enumerate(zip(req_ids, first)):
            d = self.states[req_id]
            d.draft_len = p + len(emitted[req_id])
            d.num_fed = 0
            d.table, d.row, d.count, d.probs = table, i, self.k, None
        return dict.fromkeys(req_ids, self.k)

    def _set_step_features(self, host: HostInputs, hidden: torch.Tensor | None) -> None:
        aux = self.runner.aux_hidden
        self._features = aux.rows(len(host.input_ids)) if aux is not None else hidden

    def _first_feedable(self, s: Any) -> int:
        # The target's hidden states of this step start at its first computed position.
        return s.num_computed_tokens

    def _target_condition(self, rows: list[int]) -> torch.Tensor:
        first = rows[0]
        if rows[-1] - first == len(rows) - 1 and rows == list(range(first, first + len(rows))):
            features = self._features[first: first + len(rows)]  # one request, or consecutive rows: no gather
        else:
            features = self._features.index_select(0, torch.tensor(rows, dtype=torch.int64, device=self.device))
        return self.model.condition_target(features)

    def _proposal_condition(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden
