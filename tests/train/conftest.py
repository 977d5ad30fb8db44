"""Fixtures of the driver tests."""

from __future__ import annotations

import pytest

# Meta-Llama-3's published architectures (their config.json values), built only on the meta
# device: the Llama recipes are validated against them without any hub access.
LLAMA3 = {
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
               max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256,
                max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def llama3_config():
    """``llama3_config("8B" | "70B")`` → a ``LlamaConfig`` of that size (no weights)."""
    from transformers import LlamaConfig

    return lambda size: LlamaConfig(**LLAMA3[size])


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("weights were loaded before the recipe was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", boom)
    # partitioned loading (ZeRO-3, FSDP2) reads the safetensors files itself
    monkeypatch.setattr("riemann_zero.train.engines.loading.load_local_parts", boom)
