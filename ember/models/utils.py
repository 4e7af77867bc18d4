"""Helpers shared by model files: HF checkpoint names -> Ember parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

# (Ember param fragment, checkpoint fragment, shard id), e.g. ("qkv_proj", "q_proj", "q").
StackedMapping = Sequence[tuple[str, str, str | int]]
# (Ember param suffix, checkpoint suffix, expert id, shard id), see FusedMoE.make_expert_params_mapping.
ExpertMapping = Sequence[tuple[str, str, int | None, str]]


def _resolve(name: str, stacked: StackedMapping, experts: dict[str, tuple[str, int | None, str]]
             ) -> tuple[str, tuple[str | int | None, ...]]:
    """Target parameter name and extra weight_loader arguments of one checkpoint name."""
    parts = name.split(".")
    for i in range(1, len(parts)):  # expert suffixes by dict lookup: checkpoints hold ~10^5 expert tensors
        suffix = ".".join(parts[i:])
        if suffix in experts:
            param_suffix, expert_id, shard_id = experts[suffix]
            return ".".join(parts[:i] + [param_suffix]), (shard_id, expert_id)
    for param_name, weight_name, shard_id in stacked:
        if f".{weight_name}." in name:
            return name.replace(f".{weight_name}.", f".{param_name}."), (shard_id,)
    return name, ()


def load_hf_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    stacked_params_mapping: StackedMapping = (), expert_params_mapping: ExpertMapping = (),
                    skip: Callable[[str], bool] = lambda name: False) -> set[str]:
    """Copy HF-named checkpoint tensors into ``model``'s parameters.

    Each tensor goes through the ``weight_loader`` of the module owning its
    parameter when that module has one (stacked / sharded / expert layouts),
    else it is copied as is.

    Args:
        stacked_params_mapping: checkpoint projections stacked into one parameter.
        expert_params_mapping: per-expert checkpoint weights stacked into FusedMoE's.
        skip: checkpoint names to ignore (e.g. rotary buffers, tied heads, MTP layers).
    Returns:
        Names of the parameters that were loaded.
    Raises:
        ValueError: an unexpected weight name or a shape mismatch.
    """
    params = dict(model.named_parameters())
    experts = {w: (p, e, s) for p, w, e, s in expert_params_mapping}
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip(name):
            continue
        target, extra = _resolve(name, stacked_params_mapping, experts)
        if target not in params:
            raise ValueError(f"checkpoint weight {name!r} has no matching parameter in {type(model).__name__}")
        param = params[target]
        owner = model.get_submodule(target.rsplit(".", 1)[0])
        loader = getattr(owner, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, *extra)
        else:
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(param.shape)}")
            param.data.copy_(tensor)
        loaded.add(target)
    return loaded
