"""Evaluation stage: lm-evaluation-harness on a run's stock PEFT adapter.

``python -m eval RUN_DIR --suite commonsense|math|code [--limit N]`` (see ``eval.__main__``), or
``eval.evaluate(...)`` from Python. Task YAMLs for the stock ``lm_eval`` CLI live in ``eval/tasks``
(``--include_path eval/tasks``).
"""

from __future__ import annotations

__all__ = ["evaluate", "SUITE_NAMES"]

# The suites of ``eval.suites.SUITES``, named here so that ``python -m eval --help`` can list them
# without importing torch (a test keeps the two equal).
SUITE_NAMES = ("commonsense", "math", "code")


def evaluate(*args, **kwargs):
    """Lazy alias of ``eval.runner.evaluate`` (keeps ``import eval`` free of torch)."""
    from eval.runner import evaluate as _evaluate

    return _evaluate(*args, **kwargs)
