"""PoolingParams: a request that returns the model's pooled hidden states (an
embedding) instead of generating.

Such a request computes its prompt once (prefill only: no token is sampled, its
KV blocks are freed as soon as it is done, and it takes no prefix-cache hits,
since every position's hidden state may be needed) and returns one vector of
``hidden_size`` floats: the final hidden states (after the model's last norm,
what Hugging Face's ``AutoModel`` returns as ``last_hidden_state``) pooled
over the prompt's positions, in float32:

* ``LAST``: the last prompt token's hidden state (what a causal model has
  read the whole prompt for; vLLM's default for decoder models);
* ``MEAN``: the mean over all prompt tokens.

With ``normalize`` the vector is scaled to unit L2 norm (vLLM's default for
embeddings), so that dot products are cosine similarities.
"""

from __future__ import annotations

from dataclasses import dataclass

POOLING_TYPES = ("LAST", "MEAN")


@dataclass
class PoolingParams:
    """How to pool a prompt's hidden states (see the module docstring).

    Raises:
        ValueError: an unknown ``pooling_type`` (the message starts with it).
    """

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
