"""Evaluate a run: base model, its adapter and baseline adapters on one suite, task by task.

Each (model, task) result is cached as JSON under ``RUN_DIR/eval/cache/``, keyed by everything
that changes the numbers, so an interrupted evaluation resumes where it stopped. The models are
lm-eval's ``HFLM`` with ``peft=`` (the stock PEFT adapter, exactly what
``lm_eval --model hf --model_args pretrained=...,peft=...`` builds), and the tasks are the YAMLs
in ``eval/tasks`` loaded through ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from eval import checks, report, suites
from riemann_zero import io
from riemann_zero.progress import configure_logging, say

__all__ = ["evaluate", "versions", "samples_name"]

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when cached entries stop being comparable


def versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers."""
    return io.versions(("riemann-zero", "lm_eval", "torch", "transformers", "peft", "datasets"),
                       missing="not installed")


def _file_stamp(adapter: Path | None) -> str | None:
    if adapter is None:
        return None
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter / name).read_bytes())
    return digest.hexdigest()[:16]


def _gen_kwargs(task: str, max_gen_toks: int | None, num_beams: int | None) -> dict | None:
    kwargs: dict[str, Any] = {}
    if task.startswith("rz_gen_"):
        # The papers' decoding: 4 beams (NVlabs/DoRA commonsense_reasoning/commonsense_evaluate.py).
        if num_beams:
            kwargs["num_beams"] = num_beams
    elif max_gen_toks and not task.startswith("rz_ll_"):
        kwargs["max_gen_toks"] = max_gen_toks  # the commonsense protocol keeps its 32
    return kwargs or None


class _Model:
    """An lm-eval HFLM built on first use (cached tasks never load a model)."""

    def __init__(self, label: str, base: str, adapter: Path | None, batch_size: int,
                 device: str) -> None:
        self.label, self.base, self.adapter = label, base, adapter
        self.batch_size, self.device = batch_size, device
        self.stamp = _file_stamp(adapter)
        self._lm = None

    @property
    def lm(self):
        if self._lm is None:
            from lm_eval.models.huggingface import HFLM

            kwargs = {"pretrained": self.base, "dtype": "float32", "device": self.device,
                      "batch_size": self.batch_size}
            if self.adapter is not None:
                kwargs["peft"] = str(self.adapter)
            self._lm = HFLM(**kwargs)
        return self._lm


def _refuse_overwrite(out_dir: Path, suite: str, settings: dict[str, Any], adapter: str,
                      overwrite: bool) -> None:
    """Earlier results of this suite with other settings (or another adapter) are kept."""
    path = out_dir / "results.json"
    if overwrite or not path.exists():
        return
    old = json.loads(path.read_text())
    res = old.get("suites", {}).get(suite)
    if res is None and old.get("adapter") in (None, adapter):
        return
    before = {k: (res or {}).get(k) for k in settings}
    if old.get("adapter") == adapter and before == settings:
        return  # the same evaluation again: cached tasks are reused
    diff = ", ".join(f"{k} {before[k]!r} there vs {settings[k]!r} now" for k in settings
                     if before[k] != settings[k]) or f"adapter {old.get('adapter')}"
    raise ValueError(f"{out_dir} already holds {suite} results computed with other settings "
                     f"({diff}); pass --output-dir DIR to write beside them, or --overwrite to "
                     f"replace them")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def samples_name(suite: str, label: str) -> str:
    """File name of one model's generations in the output folder, e.g.
    ``samples_commonsense_base.jsonl``."""
    return f"samples_{suite}_{_slug(label)}.jsonl"


def _run_task(model: _Model, task: str, task_manager, limit: int | None,
              gen_kwargs: dict | None) -> dict[str, Any]:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=model.lm, tasks=[task], task_manager=task_manager, limit=limit,
        log_samples=True, gen_kwargs=gen_kwargs, confirm_run_unsafe_code=True,
        bootstrap_iters=0,
    )
    samples = [
        {"doc_id": s["doc_id"], "target": s.get("target"), "resps": s.get("resps"),
         "filtered_resps": s.get("filtered_resps"),
         **{k: v for k, v in s.items() if k in {m.split(",")[0] for m in out["results"][task]}}}
        for s in out["samples"][task]
    ]
    return {"results": out["results"][task], "n_samples": out["n-samples"].get(task),
            "config": out["configs"].get(task), "samples": samples}


def evaluate(run_dir: str | os.PathLike, suite: str, *, limit: int | None = None,
             compare: list[str] | tuple[str, ...] = (), base: str | None = None,
             tasks: list[str] | None = None, template: str | None = None,
             batch_size: int = 8, device: str = "cpu", max_gen_toks: int | None = None,
             num_beams: int | None = None, output_dir: str | os.PathLike | None = None,
             include_base: bool = True, overwrite: bool = False,
             log_level: str = "info") -> dict[str, Any]:
    """Score a run's adapter (and the base model, and ``compare`` adapters) on one suite.

    Args:
        run_dir: a training ``output_dir`` or an adapter folder.
        suite: ``"commonsense"``, ``"math"`` or ``"code"``.
        limit: documents per task (lm-eval's ``--limit``); ``None`` for the full sets.
        compare: other run directories / adapter folders to put beside it in the tables.
        base: base model path, overriding the adapter's ``base_model_name_or_path``.
        tasks: a subset of the suite's lm-eval task names.
        template: prompt template of protocol (b), ``"chat"``/``"alpaca"``; default: the
            recipe's ``data.template``, else ``"chat"``.
        batch_size: lm-eval batch size (generation is batched too).
        device: torch device.
        max_gen_toks: cap on generated tokens for math and code (commonsense keeps 32).
        num_beams: beam search for protocol (b) (the papers use 4); default greedy.
        output_dir: where results go; default ``RUN_DIR/eval``.
        include_base: also score the base model without adapter.
        overwrite: replace this suite's results in ``output_dir`` even when they were computed
            with other settings (without it such a rerun is refused: nothing is overwritten).
        log_level: ``riemann_zero.progress.configure_logging`` level for lm-eval's messages.

    Returns:
        The content written to ``results.json``: shared fields (adapter, base, recipe,
        versions, data sources, output_dir) and ``suites[suite]`` with every model's lm-eval
        results.

    Raises:
        ValueError: bad arguments, or ``output_dir`` holding this suite's results computed with
            other settings (and ``overwrite`` not given).
    """
    from tqdm.auto import tqdm

    task_names = suites.suite_tasks(suite, tasks)  # unknown suite / task: fails here, first
    target = checks.resolve(run_dir, base)
    others = [checks.resolve(c, target.base) for c in compare]
    for t in [target, *others]:
        checks.check_compatible(t.adapter, target.base)
    if template is None:
        template = ((target.recipe or {}).get("data", {}) or {}).get("template") or "chat"
    if template not in ("chat", "alpaca"):
        raise ValueError(f"template must be 'chat' or 'alpaca', but got {template!r}")
    out_dir = (Path(output_dir) if output_dir else target.run_dir / "eval").resolve()
    settings = {"limit": limit, "template": template, "num_beams": num_beams,
                "max_gen_toks": max_gen_toks, "tasks": task_names}
    _refuse_overwrite(out_dir, suite, settings, str(target.adapter), overwrite)
    cache_dir = out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)

    from lm_eval.tasks import TaskManager

    configure_logging(log_level)

    from eval import data

    data.prepare(list(data.DATASETS))  # cheap once cached; makes the manifest complete
    task_manager = TaskManager(include_path=str(suites.TASKS_DIR),
                               metadata={"template": template, "pretrained": target.base})

    models = ([_Model("base", target.base, None, batch_size, device)] if include_base else [])
    models.append(_Model(checks.adapter_label(target.adapter), target.base, target.adapter,
                         batch_size, device))
    for other in others:
        label = checks.adapter_label(other.adapter)
        if label in {m.label for m in models}:
            label = f"{label}-{len(models)}"
        models.append(_Model(label, target.base, other.adapter, batch_size, device))

    per_model: dict[str, dict[str, Any]] = {}
    provenance: dict[str, list[str]] = {"computed": [], "cached": []}
    bar = tqdm(total=len(models) * len(task_names), desc=f"eval {suite}", unit="task")
    started, clock = time.time(), time.perf_counter()
    for model in models:
        per_model[model.label] = {"adapter": str(model.adapter) if model.adapter else None,
                                  "tasks": {}}
        for task in task_names:
            gen_kwargs = _gen_kwargs(task, max_gen_toks, num_beams)
            key = {"format": CACHE_FORMAT, "base": model.base, "adapter": model.stamp,
                   "task": task, "limit": limit, "template": template,
                   "gen_kwargs": gen_kwargs, "versions": versions()}
            path = cache_dir / _slug(model.label) / f"{task}.json"
            cached = json.loads(path.read_text()) if path.exists() else None
            bar.set_postfix_str(f"{model.label}: {task}")
            if cached is not None and cached.get("key") == key:
                entry = cached["entry"]
                provenance["cached"].append(f"{model.label}/{task}")
            else:
                start = time.perf_counter()
                entry = _run_task(model, task, task_manager, limit, gen_kwargs)
                entry["seconds"] = round(time.perf_counter() - start, 2)
                io.write_json(path, {"key": key, "entry": entry}, indent=None)
                provenance["computed"].append(f"{model.label}/{task}")
            per_model[model.label]["tasks"][task] = entry
            bar.update(1)
            done = "cached" if path.stat().st_mtime < started else f"{entry['seconds']:.0f} s"
            bar.write(f"[eval] {model.label} / {task}: {done}")
    bar.close()
    say(f"eval {suite}: {len(models)} models x {len(task_names)} tasks in "
        f"{time.perf_counter() - clock:.0f} s")

    suite_results = {
        "suite": suite, "limit": limit, "template": template, "num_beams": num_beams,
        "max_gen_toks": max_gen_toks, "base": target.base, "tasks": task_names,
        "provenance": provenance,
        "models": {label: {"adapter": m["adapter"],
                           "results": {t: e["results"] for t, e in m["tasks"].items()},
                           "n_samples": {t: e["n_samples"] for t, e in m["tasks"].items()}}
                   for label, m in per_model.items()},
        "lm_eval_configs": {t: e["config"] for t, e in
                            next(iter(per_model.values()))["tasks"].items()},
    }
    results_path = out_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("adapter") != str(target.adapter) or results.get("base") != target.base:
        results = {}  # another adapter or base: start afresh
    results.update({
        "output_dir": str(out_dir),
        "adapter": str(target.adapter), "adapter_label": checks.adapter_label(target.adapter),
        "base": target.base, "recipe": target.recipe,
        "adapter_config": json.loads((target.adapter / "adapter_config.json").read_text()),
        "versions": versions(), "data": data.prepare(list(data.DATASETS)),
    })
    results.setdefault("suites", {})[suite] = suite_results
    io.write_json(results_path, results, indent=1)
    for label, m in per_model.items():  # generations, for reading what the model said
        with open(out_dir / samples_name(suite, label), "w") as fh:
            for task, e in m["tasks"].items():
                for s in e["samples"]:
                    fh.write(json.dumps({"task": task, **s}, default=str) + "\n")
    report.write(results, out_dir)
    return results
