"""Multi-token-prediction (MTP) proposer: the target checkpoint's own MTP
layer (DeepSeek-V3 / R1, :mod:`ember.models.deepseek_mtp`) proposes k tokens
per request from the target's final hidden states.

MTP position ``i`` reads the target's final hidden state ``h_i`` and the
token ``t_{i+1}`` and predicts ``t_{i+2}``: a head conditioned on the
target's hidden states with ``shift = 1``
(:class:`~ember.spec_decode.hidden_states.HiddenStateProposer`, which asks the
target for no extra depth: the final hidden states are what its forward
returns). Its layer keeps its own MLA cache in the target's paged pool (every
block id also indexes the MTP's cache tensor). After each step the layer runs
over the positions the step computed whose next token is known (a prefill
chunk's prompt tokens too, as for every head conditioned on the target's
hidden states; a verified step's accepted drafts and bonus token, whose
target rows are exactly the kept ones); its output at the last emitted token
gives the first proposal, and proposals 2..k apply the one layer again, fed
its own output hidden state and its previous proposal (DeepSeek-V3 Technical
Report, section 2.2).

Positions the MTP never saw (computed while speculation was off, in a step
scheduled ahead, or taken from the prefix cache) keep stale MTP K/V: that
lowers acceptance only; verification keeps the output exact whatever is
proposed (:mod:`ember.spec_decode.verify`).
"""

from __future__ import annotations

from typing import Any

import torch

from ember.spec_decode.hidden_states import HiddenStateProposer


class MTPProposer(HiddenStateProposer):
    """The MTP module of the target's checkpoint, its KV cache and its
    per-request proposals, next to the target in a
    :class:`~ember.worker.model_runner.ModelRunner`.

    Args:
        runner: the target's model runner (its model config names the
            checkpoint whose ``model.layers.{num_hidden_layers}`` is the MTP layer).
        config: the speculative decoding settings (method ``"mtp"``).
    """

    def __init__(self, runner: Any, config: Any) -> None:
        super().__init__(runner, config)
        self.model_config = runner.model_config

    def model_class(self) -> type[torch.nn.Module]:
        from ember.models.registry import ModelRegistry

        return ModelRegistry.load_mtp_class(self.model_config.architecture)
