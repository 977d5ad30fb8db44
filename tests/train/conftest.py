"""Fixtures of the driver tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("weights were loaded before the recipe was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", boom)
    # partitioned loading (ZeRO-3, FSDP2) reads the safetensors files itself
    monkeypatch.setattr("riemann_zero.train.loading.load_local_parts", boom)
