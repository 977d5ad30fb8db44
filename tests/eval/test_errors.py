"""Bad input gives one clear error before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import checks
from eval.__main__ import main


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_missing_adapter(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    msg = _cli_error(capsys, [str(tmp_path / "run"), "--suite", "commonsense"])
    assert "no PEFT adapter" in msg and "adapter/adapter_config.json" in msg


def test_unknown_suite(tmp_path, capsys):
    msg = _cli_error(capsys, [str(tmp_path), "--suite", "poetry"])
    assert "unknown suite 'poetry'" in msg and "commonsense" in msg and "math" in msg


def test_unknown_task_in_suite(tmp_path, capsys):
    msg = _cli_error(capsys, [str(tmp_path), "--suite", "math", "--tasks", "rz_ll_piqa"])
    assert "not in suite 'math'" in msg


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory):
    """A stock PEFT adapter on a random tiny Llama (hidden 64): fits no SmolLM2 layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny-llama")
    model = LlamaForCausalLM.from_pretrained(root / "tiny-llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "adapter")
    return root


def test_adapter_for_another_base_model(foreign_adapter, base_model, capsys):
    msg = _cli_error(capsys, [str(foreign_adapter / "adapter"), "--suite", "commonsense",
                              "--base", str(base_model)])
    assert "does not fit base model" in msg
    assert "in_features 64 in the adapter, 576 in the base model" in msg
    assert "--base" in msg  # the fix


def test_adapter_fits_its_own_base(foreign_adapter):
    checks.check_compatible(foreign_adapter / "adapter", str(foreign_adapter / "tiny-llama"))


def test_base_model_not_available_offline(foreign_adapter, tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = json.loads((foreign_adapter / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/not-downloaded-model"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local directory.*pass --base"):
        checks.resolve(adapter)


def test_help_returns_without_importing_torch():
    """``python -m eval --help`` parses its arguments before any heavy import: it prints the
    usage with every suite and exits 0, and torch was never imported (a fresh interpreter)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import runpy, sys\n"
            "sys.argv = ['eval', '--help']\n"
            "try:\n    runpy.run_module('eval', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m eval" in out.stdout and "commonsense" in out.stdout
    assert out.stdout.strip().endswith("NO_TORCH"), out.stdout[-200:]


def test_suite_names_listed_in_help_are_the_suites():
    from eval import SUITE_NAMES, suites

    assert tuple(SUITE_NAMES) == tuple(suites.SUITES)


def _fresh_cli(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m eval ARGV`` in a fresh interpreter that reports whether torch was imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['eval', *{argv!r}]\n"
            "try:\n    runpy.run_module('eval', run_name='__main__')\n"
            "except SystemExit as e:\n    print('EXIT', e.code)\n"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)


def test_unknown_suite_returns_without_importing_torch(tmp_path):
    """eval/README.md: an unknown ``--suite`` is a usage error that returns at once, one line,
    exit status 2, before torch is imported."""
    out = _fresh_cli([str(tmp_path), "--suite", "bogus"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EXIT", "2", "NO_TORCH"], out.stdout
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown suite 'bogus'" in err[0] and "commonsense" in err[0], err


def test_bad_limit_returns_without_importing_torch(tmp_path):
    out = _fresh_cli([str(tmp_path), "--suite", "math", "--limit", "0"])
    assert out.stdout.split() == ["EXIT", "2", "NO_TORCH"], out.stdout
    assert "must be >= 1" in out.stderr


def test_wrote_line_names_every_file_written(tmp_path, capsys, monkeypatch):
    """The CLI's last line names every file the evaluation wrote, the per-model samples files
    included, and each named path exists (the evaluation is replaced by one that writes what
    ``runner.evaluate`` writes, so no model is loaded)."""
    from eval import runner

    out = tmp_path / "eval"

    def fake_evaluate(run_dir, suite, **kwargs):
        labels = ["base", "smollm2-lora", "other/run"]
        out.mkdir()
        for name in ("results.json", "results.md", f"results_{suite}.png",
                     *(runner.samples_name(suite, label) for label in labels)):
            (out / name).write_text("x")
        return {"output_dir": str(out),
                "suites": {suite: {"models": {label: {} for label in labels}}}}

    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    assert main([str(tmp_path), "--suite", "commonsense"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("wrote "), line
    named = {Path(p) for p in line.removeprefix("wrote ").split(", ")}
    assert all(p.exists() for p in named), named
    assert named == set(out.iterdir()), sorted(set(out.iterdir()) ^ named)
