import os

import torch

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors (the
# kernel tests under tests/kernels check them there against PyTorch). Set before
# any kernel module is imported: ``triton.jit`` reads it at decoration time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from ember.loader.download import ensure_bundled_model

    return ensure_bundled_model("SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def qwen_path() -> str:
    from ember.loader.download import ensure_bundled_model

    return ensure_bundled_model("Qwen2.5-Coder-0.5B-Instruct")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch (OpenMP) thread for a module's tests: on a busy 2-core machine two
    threads are many times slower than one (a descheduled thread stalls every
    barrier)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# Keep torch to the machine's cores; CI has 2. Under pytest-xdist (`make test`
# runs two workers) each worker, and every process its tests start, gets one
# thread: two workers of two OpenMP threads each on two cores stall each other's
# barriers.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
