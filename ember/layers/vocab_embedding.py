"""Token embedding and LM head, split over the vocabulary across
tensor-parallel ranks.

The vocabulary is padded to a multiple of tp_size; rank r holds rows
``[r * V_pad / tp_size, (r + 1) * V_pad / tp_size)`` of the table (padding
rows are zeros). The embedding looks up the ids of its shard, gives zeros for
the others and all-reduces; the LM head computes its shard's logits and
all-gathers them. With tp_size 1 both are the plain lookup and product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.distributed.parallel_state import get_tp_group, get_tp_rank, get_tp_size
from ember.layers.linear import UnquantizedLinearMethod, _copy_checked, output_dim
from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig, quant_method_for


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``tp_size``."""
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """``[num_tokens] int64 -> [num_tokens, embedding_dim]``.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: hidden size.
        dtype: parameter dtype (default: torch's default dtype).
        quant_config: the model's quantization config, or None. The lookup
            reads ``weight`` as a plain table, so a method that stores it
            otherwise is refused for the embedding (the LM head takes any),
            unless the method looks rows up itself (an ``embedding(layer,
            ids)`` method, e.g. GGUF's).
        prefix: the layer's checkpoint name (e.g. ``model.embed_tokens``).

    Raises:
        ValueError: a quantization method for a (non-LM-head) embedding.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings, self.embedding_dim, self.prefix = num_embeddings, embedding_dim, prefix
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.params_dtype = dtype or torch.get_default_dtype()
        self.quant_method: LinearMethodBase = quant_method_for(quant_config, self, prefix, UnquantizedLinearMethod)
        # The method's own row lookup, for a table it stores quantized (None: F.embedding of weight).
        self._lookup = (None if isinstance(self.quant_method, UnquantizedLinearMethod)
                        else getattr(self.quant_method, "embedding", None))
        if (not isinstance(self.quant_method, UnquantizedLinearMethod) and not self._accepts_quantized
                and self._lookup is None):
            raise ValueError(f"{prefix}: the token embedding cannot take quantization method "
                             f"{type(self.quant_method).__name__}")
        self.quant_method.create_weights(self, embedding_dim, [self.num_embeddings_per_partition], embedding_dim,
                                         self.num_embeddings_padded, self.params_dtype)
        if self.num_embeddings_padded != num_embeddings:  # padding rows stay zero
            for p in self.parameters():
                p.data.zero_()

    _accepts_quantized = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._lookup is not None:
            return self._forward_lookup(input_ids)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local = torch.where(in_shard, input_ids - self.vocab_start_index, 0)
        out = F.embedding(local, self.weight) * in_shard.unsqueeze(-1).to(self.weight.dtype)
        return get_tp_group().all_reduce(out)

    def _forward_lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The lookup of a method that stores the table itself (see ``quant_config``)."""
        if self.tp_size == 1:
            return self._lookup(self, input_ids)
        in_shard = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local = torch.where(in_shard, input_ids - self.vocab_start_index, 0)
        out = self._lookup(self, local)
        out = out * in_shard.unsqueeze(-1).to(out.dtype)
        return get_tp_group().all_reduce(out)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        """Copy this rank's rows of the full checkpoint table ``loaded``
        [num_embeddings, ...] (the last shard's padding rows stay zero).

        Raises:
            ValueError: a shape that does not match.
        """
        dim = output_dim(param)
        if loaded.shape[dim] != self.num_embeddings:
            raise ValueError(f"{self.prefix}: checkpoint has {loaded.shape[dim]} rows, expected {self.num_embeddings}")
        start = min(self.vocab_start_index, self.num_embeddings)
        rows = min(self.vocab_end_index, self.num_embeddings) - start
        _copy_checked(param.data.narrow(dim, 0, rows), loaded.narrow(dim, start, rows), self)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp_size={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits through its ``quant_method``;
    may share its weight with the embedding (``tie_word_embeddings``)."""

    _accepts_quantized = True

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__(num_embeddings, embedding_dim, dtype, quant_config, prefix)
        self.bias = None

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share ``embedding``'s table (a quantized head: through its
        method's ``tie_weights(head, embedding)``, where it has one).

        Raises:
            ValueError: the head is quantized by a method that cannot tie.
        """
        if not isinstance(self.quant_method, UnquantizedLinearMethod):
            tie = getattr(self.quant_method, "tie_weights", None)  # a method that can share a quantized table
            if tie is None:
                raise ValueError(f"{self.prefix}: a quantized LM head cannot be tied to the embedding")
            tie(self, embedding)
            return
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[n, hidden] -> [n, vocab]`` float32 logits."""
        logits = self.quant_method.apply(self, hidden_states, self.bias)
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)[:, : self.num_embeddings]
        # NOTE: a no-op when the method wrote float32 already (the decode GEMM does).
        return logits.float()
