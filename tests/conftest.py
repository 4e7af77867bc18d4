import os

import pytest
import torch


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


# Keep torch to the machine's cores; CI has 2.
torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
