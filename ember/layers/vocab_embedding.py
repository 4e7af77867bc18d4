"""Token embedding and LM head (vocabulary-parallel ready; tp_size 1 today)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.linear import dense_linear


class VocabParallelEmbedding(nn.Module):
    """``[num_tokens] int64 -> [num_tokens, embedding_dim]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, dtype=dtype or torch.get_default_dtype()), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; may share its weight with
    the embedding (``tie_word_embeddings``)."""

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[n, hidden] -> [n, vocab]`` float32 logits."""
        return dense_linear(hidden_states, self.weight, out_dtype=torch.float32)
