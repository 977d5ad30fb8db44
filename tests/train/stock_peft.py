"""The driver's exported adapter checked against the trained model: stock PEFT on the original
base, in a process that never imports riemann_zero, must give the eval loss the driver computed
on the trained model at the end of training (``run.json``'s ``final_eval_loss``), and a loss other
than the base model's (the adapter changes the model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    rows_path, base, adapter = sys.argv[1:]
    rows = json.load(open(rows_path))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()

    def loss():
        num = den = 0.0
        with torch.no_grad():
            for r in rows:
                ids = torch.tensor([r["input_ids"]]); labels = torch.tensor([r["labels"]])
                n = int((labels[:, 1:] != -100).sum())
                num += model(input_ids=ids, labels=labels).loss.item() * n; den += n
        return num / den

    tuned = loss()
    with model.disable_adapter():
        base_loss = loss()
    assert "riemann_zero" not in sys.modules
    print(json.dumps({"eval_loss": tuned, "base_eval_loss": base_loss}))
""")


def stock_eval_losses(out: Path, dataset: str, limit: int, max_length: int,
                      tmp: Path) -> dict[str, float]:
    """Eval loss of ``out/adapter`` in stock PEFT on the run's base (``run.json``'s model_path) and
    of the base alone, over the driver's eval examples (``dataset``, first ``limit``, seed 0,
    chat template, ``max_length``), token-weighted as the driver's."""
    from transformers import AutoTokenizer

    from riemann_zero import data

    base = json.loads((out / "run.json").read_text())["model_path"]
    tok = AutoTokenizer.from_pretrained(base)
    examples = data.load_examples(dataset, split="eval", limit=limit, seed=0)
    rows = data.tokenize(examples, tok, template="chat", max_length=max_length)
    rows_path = tmp / "stock_eval_rows.json"
    rows_path.write_text(json.dumps(rows))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(rows_path), base,
                           str(out / "adapter")], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_adapter_is_the_trained_model(out: Path, dataset: str, limit: int, max_length: int,
                                        tmp: Path) -> None:
    """fp32; batching and padding differ between the two evaluations: 1e-4 relative."""
    import pytest

    got = stock_eval_losses(out, dataset, limit, max_length, tmp)
    want = json.loads((out / "run.json").read_text())["final_eval_loss"]
    assert got["eval_loss"] == pytest.approx(want, rel=1e-4)
    assert abs(got["base_eval_loss"] - want) > 1e-4 * abs(want)  # the adapter changes it
