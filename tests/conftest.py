"""Shared test fixtures: offline environment, tiny random Llama models, the real 4-layer SmolLM2,
a free TCP port.

Fixtures:
    tiny_llama: factory ``tiny_llama(seed=0, dtype=torch.float64, **config)`` → a random
        ``LlamaForCausalLM`` (1 layer, hidden 24, vocab 64 unless overridden), deterministic.
    smollm2_4l: path of the real SmolLM2-135M-Instruct truncated to its first 4 layers (fp32).
    free_port: a TCP port on 127.0.0.1 that was free when the test started.
"""

from __future__ import annotations

import os

# Set before transformers / datasets / huggingface_hub are imported by any test module: they read
# these at import time, and without them every load retries the (unreachable) hub for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import socket  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_LLAMA = dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **config):
    """A random tiny Llama; the same seed and config give bit-identical weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config}))
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> Callable:
    """Factory of random tiny Llamas: ``tiny_llama(seed=0, dtype=torch.float64, **config)``."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def smollm2_4l() -> Path:
    """Local transformers directory of the real SmolLM2-135M-Instruct, first 4 layers, fp32."""
    from riemann_zero import assets

    return assets.smollm2(layers=4)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reported free (bind to port 0, read, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
