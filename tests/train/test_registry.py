"""The optimizer registry: the only place of optimizer names in the driver, one row per optimizer
read by recipe validation, preflight, the builder and the loop; ``optimizer.options`` reach the
constructor; recipe sections switch off with null/false; one rank rule for preflight and layout."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import riemann_zero as rz
from riemann_zero.optim import registry
from riemann_zero.train.build import build_optimizer
from riemann_zero.train.preflight import preflight
from riemann_zero.train.recipe import RecipeError, load_recipe

DRIVER = Path(__file__).resolve().parents[2] / "riemann_zero" / "train"
TINY = "asset:smollm2:4"


def test_no_optimizer_name_outside_the_registry():
    """A new optimizer is one registry row: no other driver module spells an optimizer name."""
    names = set(registry.OPTIMIZERS)
    hits = []
    for path in sorted(DRIVER.glob("*.py")):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                hits.append((path.name, node.value))
    # The schema's default value of optimizer.name is data, not a code path.
    assert hits == [("recipe.py", "riemannion")], hits


def _tiny(tiny_llama, layout: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    if layout == "manifold":
        return rz.get_peft_model(tiny_llama(dtype=torch.float32), config, init="random")
    return get_peft_model(tiny_llama(dtype=torch.float32), config)


@pytest.mark.parametrize("name", sorted(registry.OPTIMIZERS))
def test_every_row_builds_and_steps(tiny_llama, name):
    row = registry.spec(name)
    model = _tiny(tiny_llama, row.layout)
    if row.prepare is not None:
        row.prepare(model, seed=0)
    rc = load_recipe(None, [f"optimizer.name={name}", f"init.method={row.inits[0]}",
                            "optimizer.lr=1e-3"])
    opt = build_optimizer(rc, model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    if row.health:
        health = rz.manifold_health(opt)
        assert health["orth_err_U"] < 1e-4 and health["orth_err_V"] < 1e-4


def test_options_reach_the_constructor(tiny_llama, tmp_path):
    rc = load_recipe(None, ["optimizer.options.ortho=newton_schulz",
                            "optimizer.options.ns_steps=3", "optimizer.options.lr_scale=rms"])
    assert rc.optimizer.options == {"ortho": "newton_schulz", "ns_steps": 3, "lr_scale": "rms"}
    opt = build_optimizer(rc, _tiny(tiny_llama, "manifold"))
    group = opt.param_groups[0]
    assert (group["ortho"], group["ns_steps"], group["lr_scale"]) == ("newton_schulz", 3, "rms")
    path = tmp_path / "r.yaml"  # the same as a YAML mapping
    path.write_text("optimizer:\n  name: riemannion\n  options: {ortho: newton_schulz}\n")
    assert load_recipe(path).optimizer.options == {"ortho": "newton_schulz"}


def test_unknown_option_fails_in_preflight_with_the_valid_names(tmp_path):
    rc = load_recipe(None, [f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'run'}",
                            "lora.r=8", "optimizer.options.orth=svd"])
    with pytest.raises(RecipeError, match=r"optimizer.options.orth is not an option of optimizer "
                                          r"'riemannion' \(did you mean 'ortho'\?\).*'ns_steps'"):
        preflight(rc)
    for name in registry.OPTIMIZERS:  # every row's options are real keyword arguments
        assert set(registry.spec(name).options()).isdisjoint(registry.spec(name).recipe_keys)


def test_engine_rules_come_from_the_row(tmp_path):
    base = [f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'run'}", "lora.r=8",
            "init.method=peft"]
    with pytest.raises(RecipeError, match="'stella' needs the model's 2-D LoRA weights.*stage=0"):
        preflight(load_recipe(None, [*base, "optimizer.name=stella", "engine=fsdp2"]))
    with pytest.raises(RecipeError, match="'rprec_adamw' preconditions.*bf16.enabled=false"):
        preflight(load_recipe(None, [*base, "optimizer.name=rprec_adamw",
                                     "deepspeed.bf16.enabled=true"]))
    plan = preflight(load_recipe(None, [*base, "optimizer.name=adamw", "engine=fsdp2"]))
    assert plan.grad_accum == 1


@pytest.mark.parametrize("name", ["riemannion", "riemann_sgd", "riemann_adam", "stella"])
def test_bf16_without_zero_is_refused_where_the_wrapper_would_undo_the_step(tmp_path, name):
    """DeepSpeed's ZeRO-0 bf16 wrapper copies its fp32 params over the model after each step:
    optimizers that update the adapters in place trained nothing there (loss flat, silently)."""
    base = [f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'run'}", "lora.r=8",
            f"optimizer.name={name}", "deepspeed.bf16.enabled=true",
            "init.method=" + ("peft" if name == "stella" else "loi")]
    with pytest.raises(RecipeError, match=f"'{name}'.*bf16.*deepspeed.bf16.enabled=false"):
        preflight(load_recipe(None, [*base, "deepspeed.zero_optimization.stage=0"]))
    if name != "stella":  # ZeRO-1/2/3 keep the fp32 master the optimizer writes: accepted
        for stage in (1, 2, 3):
            preflight(load_recipe(None, [*base, f"deepspeed.zero_optimization.stage={stage}"]))


@pytest.mark.parametrize("value", ["null", "false", "off", "None"])
def test_eval_after_switches_off_from_the_command_line(value):
    on = load_recipe(None, ["eval_after.suite=commonsense"])
    assert on.eval_after.suite == "commonsense"
    rc = load_recipe(None, ["eval_after.suite=commonsense", f"eval_after={value}"])
    assert rc.eval_after.suite is None  # the stage is skipped


@pytest.mark.parametrize("text", ["eval_after: null\n", "eval_after: false\n", "eval_after:\n"])
def test_eval_after_switches_off_in_yaml(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_recipe(path).eval_after.suite is None


def test_other_sections_cannot_be_switched_off(tmp_path):
    with pytest.raises(RecipeError, match="lora is a section and cannot be switched off"):
        load_recipe(None, ["lora=false"])
    path = tmp_path / "r.yaml"
    path.write_text("optimizer: false\n")
    with pytest.raises(RecipeError, match="optimizer is a section and cannot be switched off"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"eval_after is a section: set one of its keys"):
        load_recipe(None, ["eval_after=commonsense"])


def test_rank_equal_to_the_layer_width_is_one_rule(tmp_path, tiny_llama):
    """Preflight refused r = min(m, n), which the layout accepts; both now ask
    ``adapters.layout.rank_error``. SmolLM2's k_proj is 192 x 576."""
    base = [f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'run'}",
            "lora.target_modules=k_proj"]
    plan = preflight(load_recipe(None, [*base, "lora.r=192", "init.method=zero"]))
    assert plan.linear_shapes["model.layers.0.self_attn.k_proj"] == (192, 576)
    with pytest.raises(RecipeError, match=r"lora.r=193 does not fit .*k_proj \(192x576\).*"
                                          r"r <= 192"):
        preflight(load_recipe(None, [*base, "lora.r=193", "init.method=zero"]))
    with pytest.raises(RecipeError, match=r"LOI needs 2r <= min\(out, in\).*r <= 96"):
        preflight(load_recipe(None, [*base, "lora.r=97", "init.method=loi"]))
    # the layout accepts exactly what preflight accepts: r = min(m, n) on a 24 x 24 layer
    from peft import LoraConfig

    model = rz.get_peft_model(tiny_llama(dtype=torch.float64),
                              LoraConfig(r=24, target_modules=["q_proj"]))
    assert [ad.r for ad in rz.find_adapters(model)] == [24]
    with pytest.raises(ValueError, match="rank r=25 is larger than min"):
        rz.get_peft_model(tiny_llama(dtype=torch.float64),
                          LoraConfig(r=25, target_modules=["q_proj"]))


def test_stella_driver_run_logs_health_on_logged_steps_only(tmp_path):
    """StelLA runs logged no manifold health (``rz.manifold_health`` failed on StelLA); the row's
    ``health`` flag now puts it in metrics.jsonl, on the logged steps only (log_every=2 of 4)."""
    import json

    from test_resume import _train

    out = tmp_path / "run"
    proc = _train(out, "optimizer.name=stella", "optimizer.lr=1e-3", "init.method=peft",
                  "max_steps=4", "train.save_every=0", "train.eval_every=0", "train.log_every=2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for row in steps:  # fp32 masters, polar retraction every step: orthonormal to fp32 rounding
        assert 0.0 <= row["manifold/orth_err_U"] < 1e-5 and 0.0 <= row["manifold/orth_err_V"] < 1e-5
        assert not any(k.startswith("comm/") for k in row)  # one process: no collective
