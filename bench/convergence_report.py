"""Tables, statistics and plots of the convergence protocol (``bench/convergence.py``).

Reads only the per-run records under ``OUT/records`` (``convergence_records.py``: resolved
recipe, loss curves, the eval stage's accuracies and per-document correctness) and writes,
``convergence.json`` (everything the tables show, plus every curve), ``convergence.md``,
``loss_curves.png``, ``lr_grids.png`` and ``accuracy.png``. Methods whose runs are not finished
are left out of the tables (the grids show what has run), so a partial protocol reports what it
has.

    python bench/convergence_report.py              # after (or during) bench/convergence.py
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
from convergence_protocol import (
    METHODS,
    Protocol,
    final_eval_loss,
    parse_run,
    parser,
    run_name,
    tail_mean,
)

from riemann_zero import io

SUITE_TASKS = {  # protocol -> the eval stage's lm-eval tasks, in the papers' column order
    "a": ["rz_ll_boolq", "rz_ll_piqa", "rz_ll_social_iqa", "rz_ll_hellaswag",
          "rz_ll_winogrande", "rz_ll_arc_easy", "rz_ll_arc_challenge", "rz_ll_openbookqa"],
    "b": ["rz_gen_boolq", "rz_gen_piqa", "rz_gen_social_i_qa", "rz_gen_hellaswag",
          "rz_gen_winogrande", "rz_gen_arc_easy", "rz_gen_arc_challenge", "rz_gen_openbookqa"],
}
SHORT = ["BoolQ", "PIQA", "SIQA", "HellaS", "WinoG", "ARC-e", "ARC-c", "OBQA"]
BOOTSTRAP = 10_000
PAIR = ("riemannion+loi", "adamw")


def steps_to(c: dict, target: float) -> float | None:
    """First step at which the held-out loss reaches ``target`` (linear between evaluations)."""
    xs, ys = c["eval_steps"], c["eval_loss"]
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
    return None


def _ms(xs: list[float]) -> list[float]:
    return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def protocol_avg(acc: dict, p: str) -> float | None:
    vals = [acc[t] for t in SUITE_TASKS[p] if t in acc]
    return 100 * statistics.mean(vals) if len(vals) == len(SUITE_TASKS[p]) else None


def difference(left: list[dict], right: list[dict], p: str, rng: np.random.Generator,
               tasks: list[str] | None = None) -> dict:
    """Mean task-averaged accuracy of ``left`` minus ``right`` (points) with a 95 % percentile
    interval from a two-level bootstrap: seeds resampled within each method, documents resampled
    within each task (the same documents for both methods: a paired design). ``tasks``: a subset
    of protocol ``p``'s tasks (one task: that task's difference); default all of them."""
    tasks = tasks or SUITE_TASKS[p]
    ids = {t: sorted(left[0]["docs"][t]) for t in tasks}

    def cube(runs: list[dict]) -> list[np.ndarray]:  # per task: seeds x documents
        return [np.array([[r["docs"][t][d] for d in ids[t]] for r in runs]) for t in tasks]

    lc, rc = cube(left), cube(right)
    point = 100 * np.mean([lc[i].mean() - rc[i].mean() for i in range(len(tasks))])
    draws = np.zeros(BOOTSTRAP)
    for i in range(len(tasks)):
        n = lc[i].shape[1]
        docs = rng.integers(0, n, size=(BOOTSTRAP, n))
        ls = rng.integers(0, lc[i].shape[0], size=(BOOTSTRAP, lc[i].shape[0]))
        rs = rng.integers(0, rc[i].shape[0], size=(BOOTSTRAP, rc[i].shape[0]))
        # mean over resampled seeds of the mean over resampled documents
        lm = np.take_along_axis(lc[i][ls], docs[:, None, :], axis=2).mean(axis=(1, 2))
        rm = np.take_along_axis(rc[i][rs], docs[:, None, :], axis=2).mean(axis=(1, 2))
        draws += (lm - rm) / len(tasks)
    lo, hi = np.percentile(100 * draws, [2.5, 97.5])
    return {"diff": float(point), "ci95": [float(lo), float(hi)], "seeds": [len(left), len(right)],
            "docs_per_task": len(ids[tasks[0]]), "bootstrap": BOOTSTRAP}


def _scored(model: dict) -> dict:
    """An eval record's model entry with protocol (b)'s share of extracted answers (%)."""
    answered = [model["answered"][t] for t in SUITE_TASKS["b"] if t in model["answered"]]
    return {**model, "answered_b": 100 * statistics.mean(answered) if answered else None}


def summarise(a) -> dict:
    proto = Protocol(a)
    proto.records.sync()
    train, evaluation = proto.records.train, proto.records.eval
    methods = [m for m in a.methods.split(",") if m in METHODS]
    grids, rows, base = {}, {}, None
    for m in methods:
        g = proto.grid(m)
        if g is not None:
            recs = {lr: train(run_name(m, lr, 0)) for lr in g.points if lr in g.losses}
            grids[m] = {"points": g.points, "best": proto.best_lr(m), "bracketed": g.bracketed,
                        "final_eval_loss": {f"{lr:g}": None if r["status"] == "diverged"
                                            else final_eval_loss(r) for lr, r in recs.items()},
                        "curves": {f"{lr:g}": r["curve"] for lr, r in recs.items()
                                   if r["status"] == "finished"}}
        runs = [n for n in proto.finals(m) if (train(n) or {}).get("status") == "finished"]
        if not runs:
            continue
        lr = proto.best_lr(m)
        curves = [train(n)["curve"] for n in runs]
        evals = [(evaluation(n) or {}).get("scores") for n in runs]
        row = {"lr": lr, "lr_source": METHODS[m].lr_from or "own grid",
               "runs": runs, "seeds": len(runs),
               "eval_loss": _ms([tail_mean(c["eval_steps"], c["eval_loss"]) for c in curves]),
               "step_time_s": statistics.median(c["step_time_s"] for c in curves),
               "curves": curves}
        scored = [_scored(e["adapter"]) for e in evals if e and "adapter" in e]
        if scored:
            row["scored_seeds"] = len(scored)
            for p in SUITE_TASKS:
                avgs = [protocol_avg(s["acc"], p) for s in scored]
                if all(v is not None for v in avgs):
                    row[f"acc_{p}"] = _ms(avgs)
                    row[f"tasks_{p}"] = {t: _ms([100 * s["acc"][t] for s in scored])
                                         for t in SUITE_TASKS[p]}
            if all(s["answered_b"] is not None for s in scored):  # an answer was extracted
                row["answered_b"] = _ms([s["answered_b"] for s in scored])
            row["_scored"] = scored
        base = base or next((e["base"] for e in evals if e and "base" in e), None)
        rows[m] = row
    _convergence_speed(rows)
    out = {"grids": grids, "methods": rows}
    if base:
        out["base"] = {**{f"acc_{p}": protocol_avg(base["acc"], p) for p in SUITE_TASKS},
                       "answered_b": _scored(base)["answered_b"],
                       **{f"tasks_{p}": {t: 100 * base["acc"][t] for t in SUITE_TASKS[p]
                                         if t in base["acc"]} for p in SUITE_TASKS}}
    left, right = (rows.get(m, {}).get("_scored") for m in PAIR)
    if left and right:
        rng = np.random.default_rng(0)
        out["difference"] = {p: difference(left, right, p, rng) for p in SUITE_TASKS
                             if all(SUITE_TASKS[p][0] in s["docs"] for s in left + right)}
        out["difference_per_task"] = {p: {t: difference(left, right, p, rng, [t])
                                          for t in SUITE_TASKS[p]} for p in out["difference"]}
    for row in rows.values():
        row.pop("_scored", None)
    return out


def _convergence_speed(rows: dict) -> None:
    """Steps each run needs to reach two held-out losses of AdamW at the same seed (same held-out
    examples), and the ratio to AdamW's own steps; None where a run never gets there:

    - ``to_adamw_final``: AdamW's final loss (``tail_mean``). Once runs have settled, consecutive
      evaluations differ by as much as the methods do, so where a run first touches this level
      is largely noise (a run can touch it at step 30 and settle above it);
    - ``to_adamw_90``: 90 % of AdamW's drop from the base model's loss (step 0) to its final loss,
      on the steep part of the curve, where the evaluation noise moves the step little.
    """
    if "adamw" not in rows:
        return
    adamw = {parse_run(n)[1]: c for n, c in zip(rows["adamw"]["runs"], rows["adamw"]["curves"])}

    def final(ref: dict) -> float:
        return tail_mean(ref["eval_steps"], ref["eval_loss"])

    def drop90(ref: dict) -> float:
        return final(ref) + 0.1 * (ref["eval_loss"][0] - final(ref))

    for row in rows.values():
        for key, level in (("to_adamw_final", final), ("to_adamw_90", drop90)):
            per_seed = []
            for name, c in zip(row["runs"], row["curves"]):
                seed = parse_run(name)[1]
                if (ref := adamw.get(seed)) is None:
                    continue
                target = level(ref)
                mine, theirs = steps_to(c, target), steps_to(ref, target)
                per_seed.append({"seed": seed, "target": target, "steps": mine,
                                 "adamw_steps": theirs,
                                 "ratio": None if mine is None else mine / theirs})
            row[key] = per_seed


def _speed(reach: list[dict]) -> str:
    """Mean steps over the seeds that got there (mean ratio to AdamW), and how many did not."""
    got = [x["steps"] for x in reach if x["steps"] is not None]
    ratios = [x["ratio"] for x in reach if x["ratio"] is not None]
    if not reach:
        return "–"
    if not got:
        return f"not reached ({_seeds(len(reach))})"
    missed = len(reach) - len(got)
    return (f"{statistics.mean(got):.0f} ({statistics.mean(ratios):.2f}×)"
            + (f"; not reached in {missed} of {len(reach)} seeds" if missed else ""))


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n > 1 else ''}"


def _f(ms: list[float] | None, digits: int = 1, n: int = 2) -> str:
    """Mean ± std; the mean alone over one seed, which has no spread to show."""
    if not ms:
        return "–"
    return f"{ms[0]:.{digits}f}" + (f" ± {ms[1]:.{digits}f}" if n > 1 else "")


def table(a, res: dict) -> str:
    lines = [f"SmolLM2-135M (`{a.model}`, all layers), commonsense mixture, LoRA r={a.rank} on "
             f"the 7 linear modules, {a.steps} steps × {a.batch} examples (≤ {a.max_length} "
             f"tokens), linear schedule with 10 % warm-up, fp32, one process. Held-out loss: "
             f"{a.eval_loss_examples} commonsense test examples (chosen by the seed), every "
             f"{a.eval_every} steps; \"final\" is the mean of the evaluations over the last "
             f"30 % of the steps. Accuracy: the eval stage on {a.eval_limit} documents per "
             "task × 8 tasks, protocol (a) lm-eval log-likelihood and protocol (b) LLM-Adapters "
             "generative; mean ± std over seeds.", "", "Learning-rate grids (seed 0, final "
             "held-out loss; **bold**: the chosen lr):", "",
             "| method | grid | final held-out loss per lr | best strictly inside |",
             "|---|---|---|---|"]
    for m, g in res["grids"].items():
        cells = []
        for lr in g["points"]:
            v = g["final_eval_loss"].get(f"{lr:g}", "pending")
            txt = f"{lr:g}: " + ("diverged" if v is None else v if isinstance(v, str)
                                 else f"{v:.4f}")
            cells.append(f"**{txt}**" if lr == g["best"] else txt)
        inside = "yes" if g["bracketed"] else ("no" if g["best"] is not None else "pending")
        lines.append(f"| {m} | {len(g['points'])} points | {', '.join(cells)} | {inside} |")
    if not res["methods"]:  # the grids are still running: nothing chosen, nothing scored
        return "\n".join(lines) + "\n"
    lines += ["", "| method | lr (source) | seeds | final held-out loss | steps to 90 % of AdamW's "
              "drop (ratio to AdamW) | steps to AdamW's final loss (ratio) | protocol (a) avg % | "
              "protocol (b) avg % | (b) answered % |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        speed = f"{_speed(r.get('to_adamw_90', []))} | {_speed(r.get('to_adamw_final', []))}"
        part = r.get("scored_seeds", r["seeds"])  # seeds scored so far, when not all are
        some = "" if part == r["seeds"] else f" ({part} of {r['seeds']} seeds scored)"
        lines.append(f"| {m} | {r['lr']:g} ({r['lr_source']}) | {r['seeds']} | "
                     f"{_f(r['eval_loss'], 4, r['seeds'])} | {speed} | "
                     f"{_f(r.get('acc_a'), n=part)}{some} | {_f(r.get('acc_b'), n=part)}{some} | "
                     f"{_f(r.get('answered_b'), n=part)} |")
    b = res.get("base", {})
    if b.get("acc_a") is not None and b.get("acc_b") is not None:
        answered = "–" if b.get("answered_b") is None else f"{b['answered_b']:.1f}"
        lines.append(f"| base model (no adapter) | – | – | – | – | – | {b['acc_a']:.1f} | "
                     f"{b['acc_b']:.1f} | {answered} |")
    for p, name in (("a", "protocol (a)"), ("b", "protocol (b)")):
        scored = {m: r for m, r in res["methods"].items() if f"tasks_{p}" in r}
        if not scored:
            continue
        lines += ["", f"Per task, {name}, accuracy % (mean ± std over seeds):", "",
                  "| method | " + " | ".join(SHORT) + " | avg |",
                  "|---|" + "---|" * (len(SHORT) + 1)]
        for m, r in scored.items():
            n = r["scored_seeds"]  # set wherever accuracy is
            lines.append(f"| {m} | " + " | ".join(_f(r[f"tasks_{p}"][t], n=n)
                                                    for t in SUITE_TASKS[p])
                         + f" | {_f(r[f'acc_{p}'], n=n)} |")
        if b.get(f"acc_{p}") is not None:  # b: the base model's scores, read above
            lines.append("| base model (no adapter) | " + " | ".join(
                f"{b[f'tasks_{p}'][t]:.1f}" for t in SUITE_TASKS[p]) + f" | {b[f'acc_{p}']:.1f} |")
    for p, d in res.get("difference", {}).items():
        lo, hi = d["ci95"]
        lines += ["", f"Riemannion + LOI − AdamW, protocol ({p}) average: {d['diff']:+.1f} points, "
                  f"95 % interval [{lo:+.1f}, {hi:+.1f}] ({d['seeds'][0]} and {d['seeds'][1]} "
                  f"seeds, {d['docs_per_task']} documents per task; bootstrap over seeds and "
                  "documents, paired by document)" + ("; the interval includes 0." if lo <= 0 <= hi
                                                      else ".")]
        per_task = res.get("difference_per_task", {}).get(p, {})
        if per_task:
            lines.append("Per task (same bootstrap, one task at a time): " + ", ".join(
                f"{s} {e['diff']:+.1f} [{e['ci95'][0]:+.1f}, {e['ci95'][1]:+.1f}]"
                for s, e in zip(SHORT, per_task.values())) + ".")
    return "\n".join(lines) + "\n"


def plots(a, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(a.out)
    for stale in ("loss_curves.png", "accuracy.png"):  # written again below if there is data
        (out / stale).unlink(missing_ok=True)
    if res["methods"]:
        _loss_curves(a, res, plt)
    _grids(res, plt, out)
    _accuracy(a, res, plt, out)


def _loss_curves(a, res: dict, plt) -> None:
    """Mean held-out loss per method with its min-max band over seeds: the whole run (log
    scale) and the plateau from step 50 (linear), where the methods' final losses are told apart."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for m, r in res["methods"].items():
        steps = np.array(r["curves"][0]["eval_steps"])
        ys = np.array([c["eval_loss"] for c in r["curves"] if c["eval_steps"] == list(steps)])
        for ax, first in zip(axes, (0, 50)):
            keep = steps >= first
            (line,) = ax.plot(steps[keep], ys.mean(0)[keep], lw=2 if m in PAIR else 1,
                              ls="-" if m in PAIR else "--", label=f"{m} (lr {r['lr']:g}, "
                              f"{_seeds(len(ys))})")
            if len(ys) > 1:
                ax.fill_between(steps[keep], ys.min(0)[keep], ys.max(0)[keep],
                                color=line.get_color(), alpha=0.15)
    axes[0].set(xlabel="optimizer step", ylabel="held-out loss (band: min–max over seeds)",
                title=f"SmolLM2-135M, commonsense, {a.steps} steps × {a.batch}", yscale="log")
    axes[1].set(xlabel="optimizer step", ylabel="held-out loss", title="from step 50")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(a.out) / "loss_curves.png", dpi=120)
    plt.close(fig)


def _grids(res: dict, plt, out: Path) -> None:
    fig, (ax, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for k, (m, g) in enumerate(res["grids"].items()):
        pts = [(lr, v) for lr in g["points"]
               if isinstance(v := g["final_eval_loss"].get(f"{lr:g}"), float)]
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{k}", label=m)
        for j, (lr, c) in enumerate(sorted(g["curves"].items(), key=lambda x: float(x[0]))):
            right.plot(c["eval_steps"], c["eval_loss"], color=f"C{k}",
                       alpha=0.35 + 0.65 * j / max(1, len(g["curves"]) - 1),
                       label=f"{m} lr {lr}")
    ax.set(xscale="log", xlabel="learning rate",
           ylabel="final held-out loss (seed 0; mean of the last 30 % of steps)",
           title="learning-rate grids")
    ax.legend(fontsize=8)
    right.set(xlabel="optimizer step", ylabel="held-out loss (seed 0)", yscale="log",
              title="every grid run (darker: larger lr)")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "lr_grids.png", dpi=120)
    plt.close(fig)


def _accuracy(a, res: dict, plt, out: Path) -> None:
    scored = {m: r for m, r in res["methods"].items() if "acc_b" in r and "acc_a" in r}
    if scored:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        x = np.arange(len(scored))
        n = [r["scored_seeds"] for r in scored.values()]  # set with the accuracy
        for k, p in enumerate("ab"):
            ax.bar(x + (k - 0.5) * 0.38, [r[f"acc_{p}"][0] for r in scored.values()], 0.38,
                   yerr=[r[f"acc_{p}"][1] if c > 1 else np.nan  # one seed: no bar to draw
                         for r, c in zip(scored.values(), n)], capsize=3,
                   label=f"protocol ({p})")
            if "base" in res and res["base"].get(f"acc_{p}"):
                ax.axhline(res["base"][f"acc_{p}"], ls=":", color=f"C{k}",
                           label=f"base model, ({p})")
        ax.set_xticks(x, [f"{m}\n({_seeds(c)})" for m, c in zip(scored, n)], rotation=20)
        ax.set(ylabel="average accuracy, % (± std over seeds)",
               title=f"commonsense, {a.eval_limit} documents per task")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # room above the bars for the legend
        ax.legend(fontsize=8, loc="upper center", ncol=4)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=120)
        plt.close(fig)


def report(a) -> dict:
    res = summarise(a)
    res.update(args=vars(a), versions={**io.versions(("torch", "transformers", "peft",
                                                      "deepspeed", "lm_eval")),
                                       "python": platform.python_version(),
                                       "machine": platform.machine(), "cpus": os.cpu_count()})
    io.write_json(Path(a.out) / "convergence.json", res, indent=1)
    text = table(a, res)
    (Path(a.out) / "convergence.md").write_text(text)
    plots(a, res)
    print(text)
    return res


if __name__ == "__main__":
    report(parser().parse_args(sys.argv[1:]))
