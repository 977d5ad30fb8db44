"""bench/overhead.py at toy sizes: both parts run, their figures are consistent, files are written.

Timings themselves are not asserted (machines are shared); what is checked could break: the
optimizer state ratio (exact by construction), that both optimizers really step, and the
Llama-3-8B-shaped bf16 model path the GPU run uses, here built scaled down on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import overhead  # noqa: E402


def test_optimizer_part_counts_state_and_times_both():
    (row,) = overhead.optimizer_part([2], layers=1, repeats=1)
    assert row["adapters"] == 7
    # 7 Llama-3-8B projections, rank-2r factors: sum over (m + n) · 2r
    assert row["factor_entries"] == sum((m + n) * 4 for m, n in overhead.LLAMA3_8B.values())
    # One (m + n) × r momentum against AdamW's two moments of the (m + n) × 2r factors.
    assert row["state_ratio"] == pytest.approx(0.25)
    assert row["adamw_s"] > 0 and row["riemannion_s"] > 0 and row["riemannion_looped_s"] > 0


def test_llama3_config_is_the_published_architecture():
    cfg = overhead.llama3_8b_config(32)
    n_params = (cfg.vocab_size * cfg.hidden_size * 2
                + 32 * (sum(m * n for m, n in overhead.LLAMA3_8B.values()) + 2 * cfg.hidden_size)
                + cfg.hidden_size)
    assert n_params == 8_030_261_248  # Llama-3-8B's published parameter count
    for name, (m, n) in overhead.LLAMA3_8B.items():  # the factor shapes match the model's layers
        if name in ("k_proj", "v_proj"):
            assert m == cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
        assert n in (cfg.hidden_size, cfg.intermediate_size)


def test_training_part_on_a_scaled_down_llama_shaped_bf16_model():
    source = overhead._Model("llama3-8b", 1, "cpu", hidden_size=64, intermediate_size=224,
                             num_attention_heads=4, num_key_value_heads=1, vocab_size=512)
    base = source.base()
    assert next(base.parameters()).dtype == torch.bfloat16
    assert base.is_activation_checkpointing
    rows = overhead.training_part([2, 3], [2, 4], seq=8, source=source, steps=1, repeats=1)
    assert [(row["r"], row["batch"]) for row in rows] == [(2, 2), (2, 3), (4, 2), (4, 3)]
    for row in rows:
        assert row["adamw_step_s"] > 0 and row["riemannion_step_s"] > 0
        assert row["overhead"] == pytest.approx(
            row["riemannion_step_s"] / row["adamw_step_s"] - 1)


def test_cli_writes_json_plot_and_table(tmp_path):
    out = tmp_path / "o.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "overhead.py"), "--part", "optimizer", "--ranks", "2",
         "--layers", "1", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.read_text())
    assert [row["r"] for row in result["optimizer"]] == [2]
    assert result["machine"]["torch"] == torch.__version__
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2 | " in proc.stdout
