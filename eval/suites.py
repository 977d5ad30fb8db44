"""The three suites: which lm-eval tasks (in ``eval/tasks``) and which metric each table shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from riemann_zero.data.prompts import COMMONSENSE_TASKS

__all__ = ["TASKS_DIR", "Column", "SUITES", "SECTIONS", "SHORT", "COMMONSENSE_TASKS",
           "PROTOCOL_A", "PROTOCOL_B", "suite_tasks", "gen_task_name"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

PROTOCOL_A = "(a) lm-eval log-likelihood, zero-shot (acc)"
PROTOCOL_B = "(b) LLM-Adapters generative, first-match extraction (acc)"

_LL = ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
       "openbookqa"]
# Short column names, in the order of the papers' tables.
SHORT = {"boolq": "BoolQ", "piqa": "PIQA", "social_iqa": "SIQA", "social_i_qa": "SIQA",
         "hellaswag": "HellaS", "winogrande": "WinoG", "arc_easy": "ARC-e", "ARC-Easy": "ARC-e",
         "arc_challenge": "ARC-c", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA"}


def gen_task_name(task: str) -> str:
    """lm-eval task name of an LLM-Adapters task, e.g. ``"ARC-Easy"`` -> ``"rz_gen_arc_easy"``."""
    return "rz_gen_" + task.lower().replace("-", "_")


@dataclass(frozen=True)
class Column:
    """One number of a suite's table: an lm-eval task and the result key to read."""

    section: str
    task: str
    metric: str  # key in lm-eval's results[task], e.g. "acc,none"
    label: str


SECTIONS: dict[str, list[str]] = {
    "commonsense": [PROTOCOL_A, PROTOCOL_B],
    "math": ["GSM8K test, 8-shot chain-of-thought", "MATH-500, 4-shot Minerva prompt"],
    "code": ["pass@1, greedy, executed offline"],
}

SUITES: dict[str, list[Column]] = {
    "commonsense": (
        [Column(PROTOCOL_A, f"rz_ll_{t}", "acc,none", SHORT[t]) for t in _LL]
        + [Column(PROTOCOL_B, gen_task_name(t), "acc,none", SHORT[t]) for t in COMMONSENSE_TASKS]
    ),
    "math": [
        Column(SECTIONS["math"][0], "rz_gsm8k_cot", "exact_match,strict-match", "GSM8K strict"),
        Column(SECTIONS["math"][0], "rz_gsm8k_cot", "exact_match,flexible-extract",
               "GSM8K flexible"),
        Column(SECTIONS["math"][1], "rz_math500", "exact_match,none", "MATH-500"),
        Column(SECTIONS["math"][1], "rz_math500", "flexible_match,none", "MATH-500 boxed"),
    ],
    "code": [
        Column(SECTIONS["code"][0], "rz_humaneval", "pass_at_1,none", "HumanEval"),
        Column(SECTIONS["code"][0], "rz_mbpp", "pass_at_1,none", "MBPP"),
    ],
}


def suite_tasks(suite: str, only: list[str] | None = None) -> list[str]:
    """The distinct lm-eval tasks of a suite, optionally restricted to ``only``.

    Raises:
        ValueError: unknown suite, or a task in ``only`` that the suite does not have.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {sorted(SUITES)}")
    tasks = list(dict.fromkeys(c.task for c in SUITES[suite]))
    if only:
        unknown = [t for t in only if t not in tasks]
        if unknown:
            raise ValueError(f"tasks {unknown} are not in suite {suite!r}; it has {tasks}")
        tasks = [t for t in tasks if t in only]
    return tasks
