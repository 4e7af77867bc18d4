from ember.layers.attention.backend import AttentionBackend, AttentionMetadata, get_attention_backend
from ember.layers.attention.layer import Attention, ForwardContext

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "ForwardContext", "get_attention_backend"]
