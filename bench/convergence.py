"""Convergence and quality: Riemannion against the optimizers users would pick instead.

SmolLM2-135M on the commonsense mixture (real data, the same examples in the same order for every
method: a fixed token budget), every method through the training driver:

1. sweep: seed 0 at each learning rate of the method's grid; the best lr is the one with the
   lowest held-out eval loss at the end (PiSSA and LoRA-GA take AdamW's);
2. seeds: the best lr again with the other seeds;
3. eval: the eval stage's commonsense protocol (b) (LLM-Adapters generative, the papers' tables)
   on every final adapter, ``--eval-limit`` documents per task;
4. math: the best lr of Riemannion+LOI and AdamW on the math mixture (loss curves).

Steps 1-3 run method by method, so a benchmark cut short leaves complete rows.

Each run is ``python -m riemann_zero.train recipes/smollm2_commonsense.yaml k=v ...`` in
``OUT/runs/NAME``; the driver skips a finished run and the eval stage caches per-task results, so
an interrupted benchmark continues where it stopped. Writes ``OUT/convergence.json``,
``OUT/convergence.md`` (tables), ``OUT/loss_curves.png`` and ``OUT/accuracy.png``.

    python bench/convergence.py                      # the defaults below (hours on 2 CPU cores)
    python bench/convergence.py --report-only        # tables and plots from finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from riemann_zero import io

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_commonsense.yaml"

# name -> (recipe overrides, lr grid). An empty grid reuses another method's best lr.
METHODS: dict[str, tuple[list[str], list[float] | str]] = {
    "riemannion+loi": (["optimizer.name=riemannion", "init.method=loi",
                        "optimizer.weight_decay=0.00316", "optimizer.momentum=0.9"],
                       [1e-3, 3e-3]),
    "riemann_sgd+loi": (["optimizer.name=riemann_sgd", "init.method=loi",
                         "optimizer.momentum=0.9"], [3e-2, 1e-1]),
    "adamw": (["optimizer.name=adamw", "init.method=peft", "optimizer.weight_decay=0.01"],
              [1e-3, 3e-3]),
    "muon": (["optimizer.name=muon", "init.method=peft", "optimizer.weight_decay=0.2",
              "optimizer.momentum=0.95"], [3e-3, 1e-2]),
    "rprec_adamw": (["optimizer.name=rprec_adamw", "init.method=peft",
                     "optimizer.weight_decay=0.5"], [1e-3, 3e-3]),
    "stella": (["optimizer.name=stella", "init.method=peft"], [1e-3, 3e-3]),
    # Initialisations against LOI, with AdamW at its best lr.
    "adamw+pissa": (["optimizer.name=adamw", "init.method=pissa", "optimizer.weight_decay=0.01"],
                    "adamw"),
    "adamw+lora_ga": (["optimizer.name=adamw", "init.method=lora_ga",
                       "optimizer.weight_decay=0.01"], "adamw"),
}
MATH_METHODS = ("riemannion+loi", "adamw")
GEN_TASKS = ["rz_gen_boolq", "rz_gen_piqa", "rz_gen_social_i_qa", "rz_gen_hellaswag",
             "rz_gen_winogrande", "rz_gen_arc_easy", "rz_gen_arc_challenge", "rz_gen_openbookqa"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "convergence"))
    p.add_argument("--model", default="asset:smollm2", help="recipe model.name_or_path")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (the token budget)")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval-loss-examples", type=int, default=48)
    p.add_argument("--eval-limit", type=int, default=10,
                   help="documents per commonsense task for protocol (b); 0 skips the eval stage")
    p.add_argument("--no-math", action="store_true", help="skip the math run")
    p.add_argument("--report-only", action="store_true", help="no training: tables and plots")
    return p


def _common(a: argparse.Namespace) -> list[str]:
    return [f"model.name_or_path={a.model}", f"max_steps={a.steps}",
            f"train.micro_batch_size={a.batch}", "train.gradient_accumulation_steps=1",
            f"data.max_length={a.max_length}", "data.train_limit=4000",
            f"data.eval_limit={a.eval_loss_examples}", f"train.eval_every={a.steps // 2}",
            "train.save_every=0", f"lora.r={a.rank}", f"lora.lora_alpha={2 * a.rank}",
            "lora.lora_dropout=0.05", "init.batches=2", "schedule.type=linear",
            "schedule.warmup_ratio=0.1", "deepspeed.zero_optimization.stage=0",
            "eval_after.suite=null"]


def _finished(run: Path) -> bool:
    """A run the driver completed (an interrupted one has metrics but no finished run.json)."""
    info = run / "run.json"
    return info.is_file() and json.loads(info.read_text()).get("status") == "finished"


def _env() -> dict[str, str]:
    """Offline, all cores, and no inherited launcher variables: each run is its own process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS=str(os.cpu_count() or 1), TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(a, name: str, overrides: list[str], log) -> Path:
    out = Path(a.out) / "runs" / name
    if _finished(out):
        return out
    env = _env()
    cmd = [sys.executable, "-m", "riemann_zero.train", str(RECIPE), *_common(a), *overrides,
           f"output_dir={out}"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (Path(a.out) / "logs").mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "logs" / f"{name}.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"run {name} failed ({res.returncode}); see "
                           f"{Path(a.out) / 'logs' / (name + '.log')}:\n{res.stderr[-2000:]}")
    log(f"trained {name} in {time.time() - t0:.0f} s")
    return out


def _evaluate(a, run: Path, log) -> None:
    if (run / "eval" / "results.json").is_file():
        return
    env = _env()
    cmd = [sys.executable, "-m", "eval", str(run), "--suite", "commonsense", "--limit",
           str(a.eval_limit), "--tasks", ",".join(GEN_TASKS), "--no-base"]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"eval of {run} failed:\n{res.stderr[-2000:]}")
    log(f"evaluated {run.name} in {time.time() - t0:.0f} s")


def _metrics(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    out = {"steps": [r["step"] for r in train], "loss": [r["loss"] for r in train],
           "eval_steps": [r["step"] for r in evals], "eval_loss": [r["eval_loss"] for r in evals],
           "step_time_s": statistics.median(r["step_time_s"] for r in train),
           "optim_time_s": statistics.median(r["optim_time_s"] for r in train)}
    res = run / "eval" / "results.json"
    if res.is_file():
        models = json.loads(res.read_text())["suites"]["commonsense"]["models"]
        scores = next(m["results"] for k, m in models.items() if k != "base")
        out["gen_acc"] = {t: scores[t]["acc,none"] for t in GEN_TASKS if t in scores}
        out["gen_avg"] = statistics.mean(out["gen_acc"].values())
    return out


def _best_lr(a, names: dict[float, str]) -> float | None:
    """The lr whose seed-0 run ends with the lowest held-out eval loss (finished runs only)."""
    root = Path(a.out) / "runs"
    done = {lr: n for lr, n in names.items() if _finished(root / n)}
    if not done:
        return None
    return min(done, key=lambda lr: _metrics(root / done[lr])["eval_loss"][-1])


def _run_all(a, methods: list[str], log) -> dict:
    """Method by method (so that a cut-short benchmark leaves whole rows): sweep, seeds, eval."""
    runs: dict = {"sweep": {}, "seeds": {}, "math": {}, "best_lr": {}}
    best = runs["best_lr"]
    for m in methods:
        overrides, grid = METHODS[m]
        if not isinstance(grid, str):  # 1. sweep at seed 0
            for lr in grid:
                name = f"{m}_lr{lr:g}_s0"
                runs["sweep"].setdefault(m, {})[lr] = name
                if not a.report_only:
                    _train(a, name, overrides + [f"optimizer.lr={lr}", "seed=0"], log)
        lr = best.get(grid) if isinstance(grid, str) else _best_lr(a, runs["sweep"][m])
        if lr is None:
            continue
        best[m] = lr
        for seed in range(a.seeds):  # 2. the other seeds at the best lr
            name = f"{m}_lr{lr:g}_s{seed}"
            runs["seeds"].setdefault(m, []).append(name)
            if not a.report_only:
                _train(a, name, overrides + [f"optimizer.lr={lr}", f"seed={seed}"], log)
                if a.eval_limit:  # 3. the eval stage on the final adapter
                    _evaluate(a, Path(a.out) / "runs" / name, log)
    if not a.no_math:  # 4. math mixture, loss curves
        for m in MATH_METHODS:
            if m not in best:
                continue
            name = f"math_{m}_lr{best[m]:g}_s0"
            runs["math"][m] = name
            if not a.report_only:
                _train(a, name, METHODS[m][0] + [
                    f"optimizer.lr={best[m]}", "seed=0", "data.train=math",
                    "data.eval_split=holdout"], log)
    return runs


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _summarise(a, runs: dict) -> dict:
    root = Path(a.out) / "runs"
    have = lambda n: _finished(root / n)  # noqa: E731
    summary = {}
    for m, names in runs["seeds"].items():
        ms = [_metrics(root / n) for n in names if have(n)]
        if not ms:
            continue
        tail = max(1, a.steps // 4)  # final train loss: mean of the last quarter of steps
        row = {"lr": runs["best_lr"][m], "seeds": len(ms),
               "train_loss": _mean_std([statistics.mean(x["loss"][-tail:]) for x in ms]),
               "eval_loss": _mean_std([x["eval_loss"][-1] for x in ms]),
               "step_time_s": statistics.median(x["step_time_s"] for x in ms),
               "optim_time_s": statistics.median(x["optim_time_s"] for x in ms),
               "curves": [{"steps": x["steps"], "loss": x["loss"]} for x in ms],
               "sweep": {str(lr): _metrics(root / n)["eval_loss"][-1]
                         for lr, n in runs["sweep"].get(m, {}).items() if have(n)}}
        accs = [x["gen_avg"] for x in ms if "gen_avg" in x]
        if accs:
            row["gen_avg"] = _mean_std([100 * v for v in accs])
            row["gen_tasks"] = {t: _mean_std([100 * x["gen_acc"][t] for x in ms if "gen_acc" in x])
                                for t in GEN_TASKS}
        summary[m] = row
    math = {m: _metrics(root / n) for m, n in runs["math"].items() if have(n)}
    return {"methods": summary, "math": math}


def _fmt(ms: tuple[float, float], digits: int = 3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _table(a, res: dict) -> str:
    lines = [f"SmolLM2-135M (`{a.model}`), commonsense mixture, r={a.rank}, {a.steps} steps × "
             f"{a.batch} examples (max {a.max_length} tokens), mean ± std over seeds; eval loss "
             f"on {a.eval_loss_examples} held-out commonsense test examples; accuracy: protocol "
             f"(b), {a.eval_limit} documents per task × 8 tasks. Times are left out: runs shared "
             f"the machine (bench/overhead.py measures speed).", "",
             "| method | lr (best of sweep: eval loss) | seeds | train loss (last quarter) | "
             "eval loss | protocol (b) avg acc % |",
             "|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        sweep = ", ".join(f"{lr}: {v:.3f}" for lr, v in r["sweep"].items()) or "AdamW's"
        acc = _fmt(r["gen_avg"], 1) if "gen_avg" in r else "–"
        lines.append(f"| {m} | {r['lr']:g} ({sweep}) | {r['seeds']} | {_fmt(r['train_loss'])} | "
                     f"{_fmt(r['eval_loss'])} | {acc} |")
    if res["math"]:
        lines += ["", "Math mixture (holdout eval loss, seed 0, the commonsense best lr):", "",
                  "| method | first eval loss | final eval loss | final train loss |",
                  "|---|---|---|---|"]
        for m, x in res["math"].items():
            lines.append(f"| {m} | {x['eval_loss'][0]:.3f} | {x['eval_loss'][-1]:.3f} | "
                         f"{statistics.mean(x['loss'][-max(1, a.steps // 4):]):.3f} |")
    return "\n".join(lines) + "\n"


def _plots(a, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2 if res["math"] else 1, figsize=(12 if res["math"] else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    for m, r in res["methods"].items():
        curves = np.array([c["loss"] for c in r["curves"]])
        # Running mean over 3 steps: the batch-to-batch noise hides the trend otherwise.
        k = min(3, curves.shape[1])
        smooth = np.array([np.convolve(c, np.ones(k) / k, mode="valid") for c in curves])
        x = np.array(r["curves"][0]["steps"][k - 1:])
        ax.plot(x, smooth.mean(0), label=f"{m} (lr {r['lr']:g})")
        ax.fill_between(x, smooth.min(0), smooth.max(0), alpha=0.15)
    ax.set(xlabel="optimizer step", ylabel="train loss (3-step mean; band: seeds min–max)",
           title="commonsense mixture")
    ax.legend(fontsize=7)
    if res["math"]:
        ax = axes[0][1]
        for m, x in res["math"].items():
            ax.plot(x["steps"], x["loss"], label=f"{m} train")
            ax.plot(x["eval_steps"], x["eval_loss"], "o--", label=f"{m} holdout eval")
        ax.set(xlabel="optimizer step", ylabel="loss", title="math mixture (seed 0)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(a.out) / "loss_curves.png", dpi=120)
    plt.close(fig)

    scored = {m: r for m, r in res["methods"].items() if "gen_avg" in r}
    if scored:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = list(scored)
        ax.bar(names, [scored[m]["gen_avg"][0] for m in names],
               yerr=[scored[m]["gen_avg"][1] for m in names], capsize=4)
        ax.set(ylabel="protocol (b) average accuracy, % (± std over seeds)",
               title=f"commonsense, {a.eval_limit} docs/task, {a.steps} steps")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(Path(a.out) / "accuracy.png", dpi=120)
        plt.close(fig)


def _versions() -> dict:
    out = io.versions(("torch", "transformers", "peft", "deepspeed", "lm_eval"))
    return {**out, "machine": platform.machine(), "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    for m in methods:  # an init comparison needs the method whose best lr it borrows
        grid = METHODS[m][1]
        if isinstance(grid, str) and grid not in methods:
            raise SystemExit(f"{m} uses the best lr of {grid}; add {grid} to --methods")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[convergence {time.time() - t0:6.0f} s] {msg}", flush=True)

    runs = _run_all(a, methods, log)
    res = _summarise(a, runs)
    res.update(args=vars(a), versions=_versions(), runs=runs,
               command="python bench/convergence.py " + " ".join(sys.argv[1:]))
    io.write_json(Path(a.out) / "convergence.json", res, indent=1)
    table = _table(a, res)
    (Path(a.out) / "convergence.md").write_text(table)
    _plots(a, res)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
