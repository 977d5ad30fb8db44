"""Bad inputs give one clear error before any weight is loaded (reading config.json is fine)."""

from __future__ import annotations

import json

import pytest

from riemann_zero.train.preflight import preflight
from riemann_zero.train.recipe import RecipeError, load_recipe

TINY = "asset:smollm2:4"


def _recipe(tmp_path, *overrides):
    return load_recipe(None, [f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'run'}",
                              "lora.r=8", *overrides])


def test_valid_recipe_passes(tmp_path, no_weights):
    plan = preflight(_recipe(tmp_path), world_size=2)
    assert plan.model_path.endswith("-4l") and plan.resume_from is None and not plan.finished
    assert ("model.layers.0.self_attn.q_proj" in plan.linear_shapes)


def test_missing_data_file(tmp_path, no_weights):
    with pytest.raises(RecipeError, match="data file .*nope.jsonl.* does not exist"):
        preflight(_recipe(tmp_path, f"data.train={tmp_path / 'nope.jsonl'}"))


def test_unknown_dataset_suggests(tmp_path, no_weights):
    with pytest.raises(RecipeError, match="did you mean 'commonsense'"):
        preflight(_recipe(tmp_path, "data.train=comonsense"))


def test_target_module_absent(tmp_path, no_weights):
    with pytest.raises(RecipeError, match="'q_projj' matches no Linear layer.*mean 'q_proj'"):
        preflight(_recipe(tmp_path, "lora.target_modules=q_projj,v_proj"))


def test_rank_above_layer_width(tmp_path, no_weights):
    # SmolLM2: k_proj is 192 x 576 (3 KV heads of 64), so r = 193 does not fit it (r = 192 does:
    # tests/train/test_registry.py).
    with pytest.raises(RecipeError, match=r"lora.r=193 does not fit .*k_proj \(192x576\)"):
        preflight(_recipe(tmp_path, "lora.r=193", "lora.target_modules=k_proj",
                          "init.method=zero"))


def test_output_dir_holding_another_run(tmp_path, no_weights):
    run = tmp_path / "run"
    run.mkdir()
    other = _recipe(tmp_path, "optimizer.lr=0.5")
    from riemann_zero.train.recipe import recipe_to_dict

    (run / "run.json").write_text(json.dumps({"recipe": recipe_to_dict(other),
                                              "status": "running"}))
    step = run / "checkpoints" / "step-00000003"  # something to protect
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(json.dumps({"step": 3}))
    with pytest.raises(RecipeError, match=r"holds another run .*optimizer.lr: 0.5 there"):
        preflight(_recipe(tmp_path))
    # the same recipe (run-neutral keys aside) is a resume, not a clash
    plan = preflight(_recipe(tmp_path, "optimizer.lr=0.5", "stop_after=3"))
    assert plan.resume_from == step
    with pytest.raises(RecipeError, match="already holds a run; pass resume=auto"):
        preflight(_recipe(tmp_path, "optimizer.lr=0.5", "resume=never"))


def test_stray_training_files_without_run_json(tmp_path, no_weights):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(RecipeError, match="holds training files but no run.json"):
        preflight(_recipe(tmp_path))


def test_batch_layout_must_divide(tmp_path, no_weights):
    with pytest.raises(RecipeError, match="global_batch_size=10 is not a multiple"):
        preflight(_recipe(tmp_path, "train.global_batch_size=10", "train.micro_batch_size=4"),
                  world_size=2)
    plan = preflight(_recipe(tmp_path, "train.global_batch_size=16", "train.micro_batch_size=4"),
                     world_size=2)
    assert plan.grad_accum == 2


def test_deepspeed_batch_keys_belong_to_train_section(tmp_path, no_weights):
    with pytest.raises(RecipeError, match="deepspeed.train_batch_size is derived"):
        preflight(_recipe(tmp_path, "deepspeed.train_batch_size=64"))


def test_baselines_that_need_stage_0(tmp_path, no_weights):
    base = ["init.method=peft", "deepspeed.zero_optimization.stage=2"]
    for name in ("muon", "rprec_adamw"):
        with pytest.raises(RecipeError, match="stage=0"):
            preflight(_recipe(tmp_path, f"optimizer.name={name}", *base))


def test_cli_prints_one_line_error_before_loading(tmp_path, no_weights, monkeypatch, capsys):
    from riemann_zero.train import cli as train

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="2").items():
        monkeypatch.setenv(key, value)
    code = train.cli([str(tmp_path / "missing.yaml")])
    assert code == 2 and "recipe file" in capsys.readouterr().err
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name_or_path: '{TINY}'}}\nlora: {{target_modules: [qq_proj]}}\n")
    code = train.cli([str(path), f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "'qq_proj' matches no Linear layer" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, needle", [
    ("optimizer.options.ortho=bogus",
     r"optimizer.options.ortho must be one of .*, but got 'bogus'"),
    ("optimizer.options.ns_steps=0", r"optimizer.options.ns_steps must be an int >= 1, but got 0"),
    ("optimizer.options.momentum_buffer=stored",
     r"optimizer.options.momentum_buffer must be 'raw' or 'paper', but got 'stored'"),
])
def test_bad_option_value_is_refused_before_weights_load(tmp_path, no_weights, override, needle):
    """A bad optimizer.options value used to pass preflight and fail in the optimizer's
    constructor, after the model had loaded."""
    with pytest.raises(RecipeError, match=needle):
        preflight(_recipe(tmp_path, "optimizer.name=riemannion", "init.method=loi", override))


def test_wandb_without_the_package_is_refused_before_weights_load(tmp_path, no_weights,
                                                                  monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError, match="logging.wandb=true needs wandb"):
        preflight(_recipe(tmp_path, "logging.wandb=true"))
    preflight(_recipe(tmp_path, "logging.wandb=false"))  # the same recipe without it passes
