"""Programmatic dependent launch (PDL) for the decode-path Triton kernels.

A decode step is a chain of short kernels; between two of them the GPU drains
the first, then starts the second, which spends its first microseconds waiting
for its first loads. On Hopper (sm_90) and later a kernel launched with PDL may
start while its predecessor still runs: its programs run up to
``griddepcontrol.wait`` (:func:`gdc_wait`), which blocks until the predecessor
has completed and its writes are visible. A predecessor lets its successor
launch early with ``griddepcontrol.launch_dependents``
(:func:`gdc_launch_dependents`). See the PTX ISA, "griddepcontrol", and the
CUDA programming guide, "Programmatic Dependent Launch and Synchronization".

Rule for every kernel launched with ``launch_pdl``: no load of activations and
no store of any kind before :func:`gdc_wait`. Stream-ordered memory reuse (the
caching allocator, CUDA-graph pools) assumes kernels do not overlap, so an early
store could overwrite a buffer the predecessor still reads. Before the wait a
kernel may only touch data no kernel writes: the skinny GEMM prefetches its
weight rows into L2 there, which is what hides the gap between kernels.

``EMBER_PDL=0`` turns it off (for A/B timing).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("EMBER_PDL", "1") != "0"
PREFETCH = os.environ.get("EMBER_PDL_PREFETCH", "1") != "0"

__all__ = ["ENABLED", "gdc_launch_dependents", "gdc_wait", "pdl_release", "use_pdl"]


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: Hopper or later, and not
    turned off by ``EMBER_PDL=0``."""
    if not ENABLED or device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def pdl_release(USE_PDL: tl.constexpr):
    """First statement of a small kernel launched the ordinary way: let the
    next kernel, if it is launched with PDL, start now."""
    if USE_PDL:
        gdc_launch_dependents()
