"""Answer extraction for the generative tasks, reusing lm-eval's own definitions where it has them.

- Commonsense (LLM-Adapters protocol): ``riemann_zero.data.prompts.extract_answer`` (first regex
  match), the same function the training data is built against.
- GSM8K chain-of-thought: lm-eval's ``gsm8k-cot.yaml`` filters (strict "The answer is N." and
  flexible "last number"), applied by lm-eval itself; ``gsm8k_answers`` mirrors them for tests.
- MATH-500: lm-eval's Minerva helpers (``minerva_math/utils.py``). That module imports
  ``math_verify``/``sympy``/``antlr4`` at import time, which the stack does not ship, so the pure
  string helpers are compiled from its source here; equivalence is then exact string equality
  of normalised answers (Minerva's own exact match) without lm-eval's extra sympy check.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Any

__all__ = [
    "minerva",
    "math_gold",
    "math_answers",
    "gsm8k_answers",
    "lm_eval_task_file",
    "literal_from_function",
]

_MINERVA_NAMES = ("last_boxed_only_string", "remove_boxed", "get_unnormalized_answer",
                  "normalize_final_answer", "SUBSTITUTIONS", "REMOVED_EXPRESSIONS")
INVALID = "[invalidanswer]"


def lm_eval_task_file(relative: str) -> Path:
    """Absolute path of a file in lm-eval's task folder, e.g. ``"gsm8k/gsm8k-cot.yaml"``."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; lm-eval {_lm_eval_version()} is not supported")
    return path


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _module_ast(relative: str) -> ast.Module:
    return ast.parse(lm_eval_task_file(relative).read_text())


def literal_from_function(relative: str, function: str) -> Any:
    """The literal a zero-argument function in an lm-eval task module returns, without importing it.

    Used for few-shot exemplars whose modules cannot be imported offline (MBPP's loads a Hub
    metric at import; Minerva's needs math_verify).
    """
    for node in _module_ast(relative).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            ret = next(n for n in node.body if isinstance(n, ast.Return))
            return ast.literal_eval(ret.value)
    raise LookupError(f"{function}() not found in lm-eval's {relative}")


@functools.cache
def minerva() -> dict[str, Any]:
    """lm-eval's Minerva string helpers, compiled from ``minerva_math/utils.py``."""
    tree = _module_ast("minerva_math/utils.py")
    keep = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name in _MINERVA_NAMES)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") in _MINERVA_NAMES
                                                  for t in n.targets))]
    namespace: dict[str, Any] = {"re": re}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "minerva_math/utils.py", "exec"),
         namespace)
    missing = [n for n in _MINERVA_NAMES if n not in namespace]
    if missing:
        raise LookupError(f"lm-eval's minerva_math/utils.py lacks {missing}")
    return namespace


def _boxed(text: str) -> str | None:
    m = minerva()
    box = m["last_boxed_only_string"](text)
    if box is None:
        return None
    try:
        return m["remove_boxed"](box)
    except AssertionError:  # "\fbox{...}" or an unbalanced box
        return None


def math_gold(solution: str) -> str:
    """The normalised reference answer of a MATH solution (its last ``\\boxed{}``)."""
    boxed = _boxed(solution)
    return minerva()["normalize_final_answer"](boxed) if boxed is not None else INVALID


def math_answers(text: str) -> dict[str, str]:
    """Normalised answers in a generated MATH solution.

    Returns:
        ``{"strict": ..., "flexible": ...}``: strict is Minerva's "Final Answer: The final answer
        is X. I hope it is correct."; flexible falls back to the last ``\\boxed{}``. Either is
        ``"[invalidanswer]"`` when absent.
    """
    m = minerva()
    strict_raw = m["get_unnormalized_answer"](text)
    strict = m["normalize_final_answer"](strict_raw) if strict_raw != INVALID else INVALID
    if strict != INVALID:
        return {"strict": strict, "flexible": strict}
    boxed = _boxed(text)
    flexible = m["normalize_final_answer"](boxed) if boxed is not None else INVALID
    return {"strict": INVALID, "flexible": flexible}


@functools.cache
def _gsm8k_filters() -> list[tuple[str, str, int]]:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    cfg = yaml.load(lm_eval_task_file("gsm8k/gsm8k-cot.yaml").read_text(), Loader=_Loader)
    out = []
    for entry in cfg["filter_list"]:
        regex = next(f for f in entry["filter"] if f["function"] == "regex")
        out.append((entry["name"], regex["regex_pattern"], regex.get("group_select", 0)))
    return out


def gsm8k_answers(text: str) -> dict[str, str]:
    """What lm-eval's GSM8K-CoT filters extract, by filter name (``"[invalid]"`` if nothing).

    Uses lm-eval's ``RegexFilter`` with the patterns of ``gsm8k-cot.yaml``.
    """
    from lm_eval.filters.extraction import RegexFilter

    out = {}
    for name, pattern, group in _gsm8k_filters():
        filt = RegexFilter(regex_pattern=pattern, group_select=group)
        out[name] = list(filt.apply([[text]], [{}]))[0][0]
    return out
