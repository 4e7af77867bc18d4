"""Triton kernels. Imported lazily, only on CUDA: the CPU path never imports Triton."""
