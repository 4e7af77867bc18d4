"""Block hashing for automatic prefix caching.

A full KV block is identified by a chained hash::

    hash_i = sha256(pickle((hash_{i-1}, token_ids of block i, extra_keys_i)))

with ``hash_{-1} = None``. Because each hash covers its parent, equal hashes
mean equal token prefixes (up to sha256 collisions), so a block with a given
hash holds the same K/V whichever request computed it. ``extra_keys`` carry
anything else the K/V depend on or that must not be shared: today a
per-request ``cache_salt`` (tenant isolation), later a LoRA adapter id.
Scheme as in vLLM's v1 ``kv_cache_utils.hash_block_tokens``.

NOTE: hashes are sha256 digests of a pickle of ints, bytes, strings and
tuples, which is deterministic across processes and runs (unlike Python's
``hash`` of str, which is salted per process), so a future multi-process or
KV-offload path can compare them.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from typing import Any

from ember.request import Request

BlockHash = bytes
"""A 32-byte sha256 digest identifying a full block and its whole prefix."""


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_keys: tuple[Any, ...] | None = None) -> BlockHash:
    """Hash of one full block.

    Args:
        parent_hash: the previous block's hash (None for the first block).
        token_ids: the block's ``block_size`` token ids.
        extra_keys: other inputs the block's K/V depend on (hashable, picklable).
    Returns:
        32-byte sha256 digest.
    """
    payload = pickle.dumps((parent_hash, tuple(token_ids), extra_keys), protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.sha256(payload).digest()


def block_extra_keys(request: Request, block_index: int) -> tuple[Any, ...] | None:
    """Extra hash keys of block ``block_index`` of ``request``.

    The ``cache_salt`` goes into the first block only: the chain carries it to
    every later block. NOTE: a LoRA adapter id will be added here for every
    block (vLLM does the same) once adapters exist.
    """
    if block_index == 0 and request.cache_salt is not None:
        return (request.cache_salt,)
    return None


def update_block_hashes(request: Request, block_size: int) -> list[BlockHash]:
    """Extend ``request.block_hashes`` to cover every full block of its tokens
    (prompt and output); returns the list. Already-hashed blocks are kept, so
    the cost over a request's life is one hash per block."""
    hashes = request.block_hashes
    num_full = request.num_tokens // block_size
    tokens = request.all_token_ids
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), num_full):
        parent = hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size],
                                   block_extra_keys(request, i))
        hashes.append(parent)
    return hashes
