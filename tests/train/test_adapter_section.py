"""The ``adapter:`` recipe section: LoRA by default, PEFT's OFT/BOFT with PEFT's own keys trained
with AdamW; bad combinations refused before any weight loads; the driver trains an OFT adapter
that stock PEFT loads and that ``python -m riemann_zero.merge`` merges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from riemann_zero.train.preflight import preflight
from riemann_zero.train.recipe import RecipeError, load_recipe, orthogonal_config

REPO = Path(__file__).resolve().parents[2]
OFT = ["adapter.type=oft", "optimizer.name=adamw", "init.method=peft"]


def _recipe(tmp_path, *overrides):
    return load_recipe(None, ["model.name_or_path=asset:smollm2:4",
                              f"output_dir={tmp_path / 'run'}", *overrides])


def test_lora_is_the_default(tmp_path):
    assert _recipe(tmp_path).adapter.type == "lora"


def test_oft_recipe_gives_peft_config(tmp_path):
    rc = load_recipe(REPO / "recipes" / "smollm2_boolq_oft.yaml")
    cfg = orthogonal_config(rc)
    assert type(cfg).__name__ == "OFTConfig" and cfg.oft_block_size == 32
    assert cfg.use_cayley_neumann is True and set(cfg.target_modules) == set(
        rc.lora.target_modules)
    boft = orthogonal_config(_recipe(tmp_path, "adapter.type=boft", "optimizer.name=adamw",
                                     "init.method=peft", "adapter.config.boft_block_size=4"))
    assert type(boft).__name__ == "BOFTConfig" and boft.boft_block_size == 4


@pytest.mark.parametrize(("overrides", "needle"), [
    (["adapter.type=ofx"], "did you mean 'oft'"),
    (["adapter.type=oft", "optimizer.name=riemannion", "init.method=loi"],
     r"trains with optimizer.name in \['adamw'\] and init.method=peft"),
])
def test_bad_adapter_sections(tmp_path, overrides, needle):
    with pytest.raises(RecipeError, match=needle):
        _recipe(tmp_path, *overrides)


def test_block_size_must_divide_the_layer(tmp_path):
    rc = _recipe(tmp_path, *OFT, "adapter.config.oft_block_size=7")
    with pytest.raises(RecipeError, match="block size 7 does not divide the input dimension 576"):
        preflight(rc)


def test_bad_peft_key_named(tmp_path):
    rc = _recipe(tmp_path, *OFT, "adapter.config.oft_blok_size=8")
    with pytest.raises(RecipeError, match="adapter.config for oft"):
        preflight(rc)  # before any weight loads


@pytest.mark.slow
def test_driver_trains_oft_and_the_merge_loads(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    runs = []
    for task in ("boolq", "piqa"):
        out = tmp_path / task
        cmd = [sys.executable, "-m", "riemann_zero.train", f"recipes/smollm2_{task}_oft.yaml",
               "model.name_or_path=asset:smollm2:4", f"output_dir={out}", "max_steps=3",
               "data.train_limit=64", "data.max_length=96", "train.micro_batch_size=2",
               "train.save_every=0", "eval_after=null"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "OFT" and cfg["use_cayley_neumann"] is True
        runs.append(out / "adapter")
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "riemann_zero.merge", *map(str, runs), "--out",
                           str(merged), "--method", "orthofuse", "--restore", "spectra"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((merged / "adapter_config.json").read_text())["use_cayley_neumann"] is False
    assert json.loads((merged / "merge.json").read_text())["method"] == "orthofuse"
