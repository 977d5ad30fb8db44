"""``results.md`` (a table per suite) and ``results_<suite>.png`` (grouped bars).

Every accuracy carries its 95 % Wilson score interval from the number of documents scored (with
15 documents one question moves a score by 6.7 points, and the interval says so); the generative
protocol also reports how often the model wrote a label at all ("answered").
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from eval import suites

__all__ = ["PUBLISHED", "wilson", "table_rows", "write", "markdown", "chart"]

Z95 = 1.959963984540054  # two-sided 95 % normal quantile

# Llama-3-8B, LLM-Adapters generative protocol (b), accuracy %, in COMMONSENSE_TASKS order:
# BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA (arXiv 2507.12142 v2 Table 1,
# arXiv 2510.01938 Table 1, NVlabs/DoRA README).
PUBLISHED: dict[str, list[float]] = {
    "Raw, no FT [Riemannion T1; ARC values flagged (?)]":
        [65.0, 76.6, 73.0, 66.1, 61.3, 92.5, 82.3, 79.6],
    "LoRA r16, Adam [Riemannion T1]": [74.8, 89.8, 82.6, 96.2, 87.9, 92.4, 84.9, 88.5],
    "Riemannion r16 [Riemannion T1]": [75.7, 91.2, 83.5, 96.7, 88.6, 93.6, 86.4, 89.3],
    "LoRA r32 [StelLA T1]": [75.16, 88.14, 80.18, 95.41, 86.74, 90.84, 78.7, 87.0],
    "StelLA r32 [StelLA T1]": [75.91, 89.86, 81.68, 96.41, 87.82, 91.98, 82.34, 87.8],
    "DoRA r16 [DoRA README]": [74.5, 88.8, 80.3, 95.5, 84.7, 90.1, 79.1, 87.2],
}
PUBLISHED_MODEL = "Meta-Llama-3-8B"


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a binomial proportion p observed over n trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _n_docs(model: dict[str, Any], task: str) -> int:
    n = (model.get("n_samples") or {}).get(task) or {}
    return int(n.get("effective") or 0)


def _interval(model: dict[str, Any], col: suites.Column) -> tuple[float, float] | None:
    value, n = _value(model, col), _n_docs(model, col.task)
    if value is None or not n:
        return None
    low, high = wilson(value / 100.0, n)
    return 100.0 * low, 100.0 * high


def _value(model: dict[str, Any], col: suites.Column) -> float | None:
    res = model["results"].get(col.task)
    if res is None or res.get(col.metric) is None:
        return None
    return 100.0 * float(res[col.metric])


def _columns(suite_results: dict[str, Any], section: str) -> list[suites.Column]:
    return [c for c in suites.SUITES[suite_results["suite"]]
            if c.section == section and c.task in suite_results["tasks"]]


def table_rows(suite_results: dict[str, Any], section: str
               ) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """Column labels and one row of percentages per model for one section of a suite."""
    cols = _columns(suite_results, section)
    rows = [(label, [_value(m, c) for c in cols])
            for label, m in suite_results["models"].items()]
    return [c.label for c in cols], rows


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _cell(v: float | None, ci: tuple[float, float] | None) -> str:
    return _fmt(v) if ci is None else f"{_fmt(v)} ({ci[0]:.0f}–{ci[1]:.0f})"


def _answered(model: dict[str, Any], col: suites.Column) -> float | None:
    res = model["results"].get(col.task) or {}
    value = res.get("answered,none")
    return None if value is None else 100.0 * float(value)


def _avg(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got and len(got) == len(values) else None


def _section_md(res: dict[str, Any], section: str) -> list[str]:
    labels, rows = table_rows(res, section)
    if not labels:
        return []
    with_avg = len(labels) > 2
    head = ["model", *labels] + (["Avg"] if with_avg else [])
    lines = [f"#### {section}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    cols = _columns(res, section)
    for label, values in rows:
        model = res["models"][label]
        cells = [_cell(v, _interval(model, c)) for v, c in zip(values, cols)]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + (f" | {_fmt(_avg(values))} |" if with_avg else " |"))
    answered = [(label, [_answered(res["models"][label], c) for c in cols]) for label, _ in rows]
    if any(v is not None for _, values in answered for v in values):
        lines += ["", "Answered (% of documents where the model wrote one of the task's labels; "
                      "the rest score 0):", "", "| model | " + " | ".join(labels) + " |",
                  "|" + "---|" * (len(labels) + 1)]
        lines += [f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |"
                  for label, values in answered]
    if res["suite"] == "commonsense" and section == suites.PROTOCOL_B:
        lines += _published_md(res, labels)
    return lines + [""]


def _published_md(res: dict[str, Any], labels: list[str]) -> list[str]:
    """Published Llama-3-8B numbers for the evaluated protocol (b) columns, clearly labelled."""
    order = [suites.SHORT[t] for t in suites.COMMONSENSE_TASKS]
    idx = [order.index(label) for label in labels]
    same = PUBLISHED_MODEL.lower().replace("meta-", "") in str(res["base"]).lower()
    note = ("same base model and protocol: comparable up to template and decoding" if same
            else f"a different base model ({Path(str(res['base'])).name}): **not comparable** "
            "with the rows above, shown for scale only")
    full = len(idx) == len(order)
    lines = ["", f"Published, {PUBLISHED_MODEL}, same protocol (b); {note}.", "",
             "| published | " + " | ".join(labels) + (" | Avg |" if full else " |"),
             "|" + "---|" * (len(labels) + 1 + full)]
    for name, values in PUBLISHED.items():
        picked = [values[i] for i in idx]
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in picked)
                     + (f" | {_fmt(_avg(values))} |" if full else " |"))
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole ``results.md``: a header, then each evaluated suite's tables."""
    lines = ["# Evaluation results", "",
             f"- adapter: `{results['adapter']}`", f"- base model: `{results['base']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    for suite, res in results["suites"].items():
        n = {t: v for t, v in next(iter(res["models"].values()))["n_samples"].items()}
        sizes = sorted({(v or {}).get("effective") for v in n.values()} - {None})
        lines += [f"## {suite}", "",
                  f"Accuracy in %; documents per task: {', '.join(map(str, sizes)) or '?'}"
                  + (f" (`--limit {res['limit']}`)" if res["limit"] else " (full sets)")
                  + f"; template `{res['template']}`"
                  + (f"; {res['num_beams']} beams" if res.get("num_beams") else "; greedy")
                  + ". In brackets: the 95 % interval (Wilson, from the documents scored)."
                  + f" Chart: `results_{suite}.png`.", ""]
        for section in suites.SECTIONS[suite]:
            lines += _section_md(res, section)
    return "\n".join(lines)


def chart(res: dict[str, Any], path: Path) -> None:
    """Grouped bar chart of one suite: one group per table column, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, series, bounds = [], {}, {}
    for section in suites.SECTIONS[res["suite"]]:
        cols, rows = table_rows(res, section)
        prefix = section.split(")")[0] + ") " if section.startswith("(") else ""
        labels += [prefix + c for c in cols]
        for model, values in rows:
            series.setdefault(model, []).extend(values)
            bounds.setdefault(model, []).extend(
                _interval(res["models"][model], c) for c in _columns(res, section))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) * max(1, len(series)) ** 0.5),
                                    4.0))
    for i, (model, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        heights = [v or 0.0 for v in values]
        err = [[h - ci[0] if ci else 0.0 for h, ci in zip(heights, bounds[model])],
               [ci[1] - h if ci else 0.0 for h, ci in zip(heights, bounds[model])]]
        bars = ax.bar(xs, heights, width, label=model, yerr=err, capsize=2,
                      error_kw={"elinewidth": 0.8, "alpha": 0.7})
        for x, v, bar in zip(xs, values, bars):  # zero (and missing) bars stay visible
            if not v:
                ax.plot([x - width / 2, x + width / 2], [0, 0], lw=2.5,
                        color=bar.get_facecolor())
                ax.annotate("–" if v is None else "0", (x, 0), xytext=(0, 2),
                            textcoords="offset points", ha="center", fontsize=6)
    ax.set_ylim(bottom=-2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("% (bars: 95 % interval)")
    limit = f", --limit {res['limit']}" if res["limit"] else ""
    title = f"{res['suite']} ({Path(str(res['base'])).name}{limit})"
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path) -> None:
    """Write ``results.md`` and one PNG per evaluated suite into ``out_dir``."""
    (out_dir / "results.md").write_text(markdown(results))
    for suite, res in results["suites"].items():
        chart(res, out_dir / f"results_{suite}.png")
