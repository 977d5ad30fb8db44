"""The GPU kit (bench/gpu/) cannot rot: its dry run goes end to end on the CPU in the default
suite, and what the GPU run would trust — the correctness checks, the wheel set, the report — is
checked for the properties it promises.

The dry run runs the very script the GPU machine runs (bench/gpu/check.sh) at tiny sizes, skipping
only the install, CUDA, NCCL and bf16 autocast; about 1 min on 2 idle cores, 2–3 min under load.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "bench" / "gpu"
sys.path.insert(0, str(GPU))
sys.path.insert(0, str(REPO / "bench"))

import correctness  # noqa: E402
import report  # noqa: E402
import wheelset  # noqa: E402

EXPECTED = {"env.json", "correctness.json", "driver.json", "overhead_training.json",
            "overhead_optimizer.json", "summary.json", "check.log"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-kit") / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("PYTHONPATH", None)  # check.sh puts the repository first itself
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(["bash", str(GPU / "check.sh"), "--dry-run", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    return out, proc


def _json(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_dry_run_passes_and_returns_at_most_eight_files(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert {p.name for p in out.iterdir()} == EXPECTED  # the device returns at most 8 files
    summary = _json(out, "summary")
    assert summary["ok"]
    assert [r["part"] for r in summary["parts"]] == [
        "install", "env", "correctness", "driver", "overhead_training", "overhead_optimizer"]
    assert summary["parts"][0]["status"] == "skipped"
    assert all(r["status"] == "ok" for r in summary["parts"][1:])
    env = _json(out, "env")
    assert env["dry_run"] and env["versions"]["torch"] == md.version("torch")
    assert {s.split()[0] for s in env["skipped_in_dry_run"]} == {"CUDA", "NCCL", "bf16"}
    # the report's section is printed at the end of the run and kept in check.log
    log = (out / "check.log").read_text()
    assert report.BEGIN in log and report.END in log and "Dry run on the CPU" in log


def test_dry_run_correctness_has_teeth(dry_run):
    out, _ = dry_run
    c = _json(out, "correctness")
    assert c["ok"] and c["dry_run"]
    rie = c["riemannion"]
    assert rie["adapters"] == 2 * 7 and rie["adapter_dtype"] == "bfloat16"
    dense = set()
    for step in rie["steps"]:
        for row in step["rows"]:
            assert row["error"] <= row["tol"], row
            # a formula error moves X by a fraction of the step: the tolerance is far below it
            assert row["tol"] < row["step"] / 100, row
            if row["reference"].startswith("dense"):
                dense.add(tuple(row["shape"]))
    assert len(dense) == 4  # every distinct Llama projection shape met the dense oracle
    for key in ("tensorion", "merge"):
        assert c[key]["ok"] and all(r["error"] <= r["tol"] for r in c[key]["rows"])


def test_dry_run_driver_adapter_reloads_in_stock_peft(dry_run):
    out, _ = dry_run
    run = _json(out, "driver")["engines"]["zero2"]
    assert run["ok"] and run["status"] == "finished" and run["world_size"] == 1
    assert len(run["train_losses"]) == 10
    assert run["stock_gap"] <= run["tol"] < run["adapter_effect"] / 10
    assert run["final_eval_loss"] < run["base_float32"]


def test_dry_run_overhead_rows(dry_run):
    out, _ = dry_run
    train = _json(out, "overhead_training")
    assert train["complete"] and [(r["r"], r["batch"]) for r in train["training"]] == [(2, 2),
                                                                                      (4, 2)]
    for row in train["training"]:
        assert row["overhead"] == pytest.approx(row["riemannion_step_s"] / row["adamw_step_s"] - 1)
    opt = _json(out, "overhead_optimizer")
    assert opt["complete"] and [r["r"] for r in opt["optimizer"]] == [2]
    assert opt["optimizer"][0]["state_ratio"] == pytest.approx(0.25)


def test_riemannion_check_catches_a_wrong_momentum(monkeypatch):
    """A device optimizer with β = 0.85 instead of 0.9: the first step (no momentum yet) still
    passes, the second must fail."""
    real = correctness.rz.Riemannion

    def wrong(adapters, **hp):
        if adapters[0].lora_B.dtype == correctness.torch.bfloat16:  # the "device" optimizer
            hp = {**hp, "momentum": 0.85}
        return real(adapters, **hp)

    monkeypatch.setattr(correctness.rz, "Riemannion", wrong)
    result = correctness.riemannion(correctness.common.sizes(True))
    assert [s["ok"] for s in result["steps"]] == [True, False]


def test_wheel_set_is_pinned_to_this_environment_and_leaves_the_images_big_packages():
    kit = wheelset.kit()
    for name in ("deepspeed", "transformers", "peft", "accelerate", "tokenizers",
                 "huggingface-hub", "safetensors", "datasets", "lm-eval", "evaluate", "dill"):
        assert kit[name] == md.version(name)
    assert not set(wheelset.DEVICE_HAS) & set(kit)
    assert not {"sympy", "networkx", "matplotlib", "tensorboard"} & set(kit)  # torch's; unused
    assert set(wheelset.BUILD) <= set(kit)


def test_missing_pins_are_reported(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(f"peft=={md.version('peft')}\n# comment\n\n")
    assert wheelset.missing(str(req)) == []
    req.write_text("peft==0.0.1\nno-such-package-here==1.0\n")
    assert [line.split()[0] for line in wheelset.missing(str(req))] == [
        "peft==0.0.1", "no-such-package-here==1.0"]


def test_benchmarks_section_is_the_generators_and_update_keeps_the_rest(tmp_path):
    text = (REPO / "BENCHMARKS.md").read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    body = text.split(report.BEGIN)[1].split(report.END)[0]
    assert body.startswith("\n## GPU\n")
    assert report.section(None) in text or "**Device:**" in body  # the placeholder, or a run's
    doc = tmp_path / "B.md"
    doc.write_text("# Title\n\nbefore\n\n" + report.section(None) + "\nafter\n")
    report.update(doc, report.section({}))
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\nafter\n")
    assert text.count(report.BEGIN) == 1 and "No GPU run yet" not in text
    plain = tmp_path / "C.md"
    plain.write_text("# Only a title\n")
    report.update(plain, report.section(None))
    assert plain.read_text().startswith("# Only a title\n\n" + report.BEGIN)


@pytest.mark.parametrize("script", ["check.sh", "wheels.sh"])
def test_scripts_parse_as_bash(script):
    assert subprocess.run(["bash", "-n", str(GPU / script)]).returncode == 0


def test_check_without_an_output_folder_is_a_usage_error():
    proc = subprocess.run(["bash", str(GPU / "check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: bash bench/gpu/check.sh" in proc.stderr
