"""Fixtures shared by the speculative decoding tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def no_load(monkeypatch):
    """Make ModelRunner.load_model fail, for tests that a bad speculative_config is refused before loading."""
    import ember.worker.model_runner as mr

    def fail(self):
        raise AssertionError("nothing must load with a bad speculative_config")

    monkeypatch.setattr(mr.ModelRunner, "load_model", fail)
