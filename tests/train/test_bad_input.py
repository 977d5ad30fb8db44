"""Mistakes that need no weights fail in preflight with one line naming the problem and the fix:
YAML syntax, non-finite numbers, DeepSpeed config typos, malformed or empty data files, a local
file asked for an eval split, eval-stage arguments; a run that stopped before its first checkpoint
does not block a corrected rerun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from riemann_zero.train.preflight import preflight
from riemann_zero.train.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = "asset:smollm2:4"


def _recipe(tmp_path, *overrides):
    return load_recipe(None, [f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'run'}",
                              "lora.r=8", *overrides])


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_yaml_syntax_error_in_the_recipe_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\noptimizer:\n  lr: [1e-3\n  name: adamw\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    message = _one_line(err)
    assert str(bad) in message and "YAML syntax error at line" in message
    assert "column" in message


def test_yaml_syntax_error_in_an_override_value():
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["deepspeed.bf16={enabled: true"])
    message = _one_line(err)
    assert "override deepspeed.bf16={enabled: true" in message and "quote the value" in message


def test_driver_prints_yaml_errors_as_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {lr: 1e-3\n")
    proc = subprocess.run([sys.executable, "-m", "riemann_zero.train", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "YAML syntax error" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,key", [("optimizer.lr=nan", "optimizer.lr"),
                                          ("optimizer.lr=inf", "optimizer.lr"),
                                          ("optimizer.options.eps=.nan", "optimizer.options.eps"),
                                          ("deepspeed.gradient_clipping_x=-.inf",
                                           "deepspeed.gradient_clipping_x")])
def test_non_finite_numbers_anywhere_are_refused(override, key):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    message = _one_line(err)
    assert message.startswith(f"{key} is ") and "must be finite" in message


def test_deepspeed_block_typo_is_caught_by_deepspeeds_schema(tmp_path, no_weights):
    rc = _recipe(tmp_path, "deepspeed.zero_optimization.stage=2",
                 "deepspeed.zero_optimization.overlap_com=true")
    with pytest.raises(RecipeError) as err:
        preflight(rc)
    message = _one_line(err)
    assert "deepspeed.zero_optimization.overlap_com" in message
    assert "did you mean 'overlap_comm'" in message


def test_deepspeed_block_bad_value(tmp_path, no_weights):
    rc = _recipe(tmp_path, "deepspeed.bf16.enabled=maybe")
    with pytest.raises(RecipeError, match=r"deepspeed.bf16.enabled: input should be a valid "
                                          r"boolean"):
        preflight(rc)


def test_malformed_jsonl_names_file_and_real_line(tmp_path, no_weights):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "Say hi", "output": "hi"})
    data.write_text(f"{good}\n{{\"instruction\": \"x\", \"output\": }}\n{good}\n")
    with pytest.raises(RecipeError) as err:
        preflight(_recipe(tmp_path, f"data.train={data}", "data.eval_split=holdout"))
    message = _one_line(err)
    assert f"{data}, line 2, column" in message and message.startswith("data.train:")


def test_empty_data_file(tmp_path, no_weights):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(RecipeError, match=r"data.train: .*empty.jsonl is empty"):
        preflight(_recipe(tmp_path, f"data.train={data}", "data.eval_split=holdout"))


def test_local_file_with_the_default_eval_split_names_the_fix(tmp_path, no_weights):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    with pytest.raises(RecipeError) as err:
        preflight(_recipe(tmp_path, f"data.train={data}"))
    message = _one_line(err)
    assert "has only a train split" in message and "data.eval_split=holdout" in message
    assert "data.eval_limit=0" in message
    preflight(_recipe(tmp_path, f"data.train={data}", "data.eval_split=holdout"))  # the fix


def test_eval_limits_fail_before_anything_loads():
    for limit in ("0", "-3"):
        proc = subprocess.run([sys.executable, "-m", "eval", "/nonexistent", "--suite",
                               "commonsense", "--limit", limit], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2
        assert f"--limit: must be >= 1, but got {limit}" in proc.stderr


def test_eval_after_limit_must_be_positive():
    with pytest.raises(RecipeError, match="eval_after.limit must be > 0"):
        load_recipe(None, ["eval_after.suite=commonsense", "eval_after.limit=0"])


def _failed_run(tmp_path, recipe_overrides: list[str], status: str) -> Path:
    out = tmp_path / "run"
    out.mkdir(parents=True, exist_ok=True)
    old = _recipe(tmp_path, *recipe_overrides)
    from riemann_zero.train.recipe import recipe_to_dict

    (out / "run.json").write_text(json.dumps({"recipe": recipe_to_dict(old), "status": status}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 1.0}) + "\n")
    return out


@pytest.mark.parametrize("status", ["failed", "running", "diverged"])
def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block(tmp_path, no_weights,
                                                                       status):
    _failed_run(tmp_path, ["optimizer.lr=1e8"], status)
    plan = preflight(_recipe(tmp_path, "optimizer.lr=1e-4"))  # the corrected rerun
    assert plan.resume_from is None and not plan.finished
    assert len(plan.notes) == 1 and "stopped before its first checkpoint" in plan.notes[0]
    assert repr(status) in plan.notes[0]


def test_a_stopped_run_with_checkpoints_still_protects_them(tmp_path, no_weights):
    out = _failed_run(tmp_path, ["optimizer.lr=1e8"], "diverged")
    step = out / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(json.dumps({"step": 2}))
    with pytest.raises(RecipeError, match="holds another run"):
        preflight(_recipe(tmp_path, "optimizer.lr=1e-4"))


def test_deepspeed_top_level_key_that_deepspeed_would_ignore(tmp_path, no_weights):
    with pytest.raises(RecipeError) as err:
        preflight(_recipe(tmp_path, "deepspeed.bf17.enabled=true"))
    message = _one_line(err)
    assert "deepspeed.bf17 is not a DeepSpeed config key" in message
    assert "did you mean 'bf16'" in message
