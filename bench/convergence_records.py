"""The convergence protocol's per-run records, kept in git so the protocol outlasts a machine.

A run directory (``OUT/runs/NAME``: checkpoints, adapter, ``metrics.jsonl``, ``run.json``, the
eval stage's output) stays outside git. When a run finishes (or diverges) its record
``OUT/records/NAME.train.json`` keeps what the protocol and the report read: the resolved recipe
and versions from ``run.json`` and the loss curves; when its adapter has been scored,
``NAME.eval.json`` keeps the accuracies and the per-document correctness. Scheduling and the
report read the records only, so a fresh clone carries on where the last machine stopped; the
one thing a record cannot give back is the adapter, which the scheduler trains again (same seed,
same examples) when an evaluation needs it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from riemann_zero import io


def curve(run: Path) -> dict:
    """Held-out loss and train loss of one run directory, by optimizer step."""
    metrics = run / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}  # a resume repeats
    train = {r["step"]: r for r in rows if "loss" in r}
    times = [r["step_time_s"] for r in train.values() if "step_time_s" in r]
    return {"eval_steps": sorted(evals), "eval_loss": [evals[s] for s in sorted(evals)],
            "steps": sorted(train), "loss": [train[s]["loss"] for s in sorted(train)],
            "step_time_s": statistics.median(times) if times else None}


def scores(run: Path) -> dict | None:
    """Per-task accuracy and per-document correctness (by doc id) of the eval stage's commonsense
    suite in a run directory: ``{"adapter": ..., "base": ...}`` (base only where it was run)."""
    res = run / "eval" / "results.json"
    if not res.is_file():
        return None
    suite = json.loads(res.read_text())["suites"]["commonsense"]
    out: dict = {}
    for label, model in suite["models"].items():
        who = "base" if label == "base" else "adapter"
        acc = {t: r["acc,none"] for t, r in model["results"].items() if "acc,none" in r}
        answered = {t: r["answered,none"] for t, r in model["results"].items()
                    if "answered,none" in r}
        docs: dict[str, dict[int, float]] = {}
        # the eval stage writes one samples file per model: the base's, and the adapter's
        files = [f for f in (run / "eval").glob("samples_commonsense_*.jsonl")
                 if (f.stem == "samples_commonsense_base") == (who == "base")]
        for line in files[0].read_text().splitlines() if files else []:
            s = json.loads(line)
            docs.setdefault(s["task"], {})[int(s["doc_id"])] = float(s["acc"])
        out[who] = {"acc": acc, "answered": answered, "docs": docs, "limit": suite["limit"]}
    return out


class Records:
    """``OUT/records``: one ``.train.json`` per finished or diverged run, one ``.eval.json`` per
    scored adapter."""

    def __init__(self, out: Path):
        self.root = Path(out) / "records"
        self.runs = Path(out) / "runs"

    def path(self, name: str, kind: str) -> Path:
        return self.root / f"{name}.{kind}.json"

    def train(self, name: str) -> dict | None:
        path = self.path(name, "train")
        return json.loads(path.read_text()) if path.is_file() else None

    def eval(self, name: str) -> dict | None:
        path = self.path(name, "eval")
        if not path.is_file():
            return None
        rec = json.loads(path.read_text())
        for model in rec["scores"].values():  # JSON keys are strings; doc ids are ints
            model["docs"] = {t: {int(d): v for d, v in ds.items()}
                             for t, ds in model["docs"].items()}
        return rec

    def sync(self) -> list[str]:
        """Write the record of every run directory that finished, diverged or was scored since
        its record was written (a run trained again for its adapter replaces its record)."""
        written = []
        for run in sorted(self.runs.iterdir()) if self.runs.is_dir() else []:
            div = run / "diverged.txt"
            if div.is_file() or finished(run):
                src = div if div.is_file() else run / "run.json"
                if _newer(src, self.path(run.name, "train")):
                    status = "diverged" if div.is_file() else "finished"
                    io.write_json(self.path(run.name, "train"), {
                        "name": run.name, "status": status,
                        "diverged": div.read_text().strip() if div.is_file() else None,
                        "run": {k: v for k, v in _run_json(run).items() if k != "model_path"},
                        "curve": curve(run)}, indent=1)
                    written.append(f"{run.name}.train")
            res = run / "eval" / "results.json"
            if res.is_file() and _newer(res, self.path(run.name, "eval")):
                io.write_json(self.path(run.name, "eval"),
                              {"name": run.name, "scores": scores(run)}, indent=1)
                written.append(f"{run.name}.eval")
        return written


def _run_json(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def finished(run: Path) -> bool:
    """A run directory the driver completed (an interrupted one has no finished run.json)."""
    return _run_json(run).get("status") == "finished"


def _newer(src: Path, record: Path) -> bool:
    return not record.is_file() or src.stat().st_mtime > record.stat().st_mtime
