"""Mixture-of-experts layers: routers (top-k selection) and the experts layer
(``FusedMoE``) with per-device implementations."""

from ember.layers.moe.layer import FusedMoE, UnquantizedFusedMoEMethod
from ember.layers.moe.router import GroupedTopKRouter, SoftmaxTopKRouter, grouped_topk, softmax_topk

__all__ = ["FusedMoE", "GroupedTopKRouter", "SoftmaxTopKRouter", "grouped_topk", "softmax_topk",
           "UnquantizedFusedMoEMethod"]
