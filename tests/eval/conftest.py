"""Shared fixtures: offline environment and one real adapter trained for the session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def base_model() -> Path:
    from riemann_zero import assets

    return assets.smollm2(layers=4)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, base_model) -> Path:
    """A training-style output_dir: ``adapter/`` (stock PEFT, 4-layer SmolLM2) + ``run.json``.

    Trained once per machine (tests/eval/adapters.py), then copied into a fresh directory.
    """
    from adapters import cached_run_dir

    return cached_run_dir(tmp_path_factory.mktemp("eval_run") / "smollm2-lora")
