"""Programmatic dependent launch (PDL) between the decode path's small
kernels and the skinny GEMMs that follow them.

A decode step alternates small kernels (RMSNorm, SiLU-and-mul, the split-KV
merge) with weight-streaming GEMMs, and ordinarily a GEMM is launched only when
the kernel before it has drained. On Hopper (sm_90) and later a kernel launched
with PDL (``launch_pdl``) may start as soon as every program of its predecessor
has executed ``griddepcontrol.launch_dependents`` (:func:`gdc_launch_dependents`);
it must execute ``griddepcontrol.wait`` (:func:`gdc_wait`), which blocks until
the predecessor has completed and its writes are visible, before it reads or
writes anything. The launch and the programs' start-up then overlap the
predecessor. See the PTX ISA, "griddepcontrol", and the CUDA programming
guide, "Programmatic Dependent Launch and Synchronization".

Here only the skinny GEMM (:mod:`ember.kernels.triton_gemm`) is launched with
PDL, when its caller asks (``use_pdl``, from ``KernelConfig.pdl``, i.e. unless
``--no-pdl``), and it waits first thing. The small kernels that precede GEMMs call
:func:`pdl_release` first thing and are launched the ordinary way, so at most
one small kernel and one GEMM overlap. Their release is a no-op when the
kernel after them was launched the ordinary way. Since nothing is read or stored before
the wait, stream-ordered memory reuse (the caching allocator, CUDA-graph
pools) stays safe.

It shortens a batch-1 decode step (compare with ``--no-pdl``; BENCHMARKS.md).
Issuing work before the wait (an L2 prefetch of the GEMM's first weight tiles,
or loading its first tile) made the step slower, so the GEMM waits first thing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAVE_GDC = True
except ImportError:  # a Triton without grid dependency control: PDL stays off
    _HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

__all__ = ["gdc_launch_dependents", "gdc_wait", "launch_options", "pdl_release", "pdl_supported", "use_pdl"]


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use PDL: a CUDA device of compute
    capability 9.0 (Hopper) or later, and a Triton with grid dependency control."""
    if not _HAVE_GDC or device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def use_pdl(device: torch.device) -> bool:
    """Whether the small kernels on ``device`` release their dependents early
    (:func:`pdl_release`): wherever PDL is supported (:func:`pdl_supported`).
    Harmless when the next kernel is not launched with PDL."""
    return pdl_supported(device)


def launch_options(pdl: bool) -> dict[str, bool]:
    """Keyword arguments of a Triton launch with PDL (none without it, so a
    Triton that predates the ``launch_pdl`` option still launches)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_release(USE_PDL: tl.constexpr):
    """Let the next kernel, if it is launched with PDL, start now (its
    :func:`gdc_wait` still waits for all of this grid). The first statement of
    the small kernels before a GEMM; the skinny GEMM calls it after its K loop."""
    if USE_PDL:
        gdc_launch_dependents()
