from ember.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    KVCacheSpec,
    get_attention_backend,
    standard_kv_cache_spec,
)
from ember.layers.attention.layer import Attention, ForwardContext, QKVAttention

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "ForwardContext", "KVCacheSpec", "QKVAttention",
           "get_attention_backend", "standard_kv_cache_spec"]
