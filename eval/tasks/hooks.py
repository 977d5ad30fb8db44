"""Functions the task YAMLs in this folder reference with ``!function hooks.<name>``.

lm-eval imports this file by path, so everything heavy lives in the ``eval`` package; this module
only adapts signatures. Data never comes from a path in a YAML: ``load`` builds it in the
absolute cache (``eval.data.data_dir()``), whatever the working directory.
"""

from __future__ import annotations

from typing import Any

from eval import answers, data, execution

__all__ = [
    "load", "load_commonsense_gen", "commonsense_gen_results", "obqa_question_stem",
    "winogrande_doc_to_text", "winogrande_doc_to_target", "winogrande_doc_to_choice",
    "gsm8k_fewshot", "minerva_fewshot", "math_results", "mbpp_fewshot", "humaneval_results",
    "mbpp_results",
]

DEFAULT_TEMPLATE = "chat"  # riemann_zero.train.recipe.DataConfig.template's default


def load(name: str, **metadata: Any):
    """``custom_dataset``: one prepared evaluation set as ``{"test": Dataset}``."""
    return data.load_split(name, **metadata)


def load_commonsense_gen(name: str, template: str | None = None, pretrained: str | None = None,
                         tokenizer: str | None = None, **metadata: Any):
    """``custom_dataset`` of the LLM-Adapters protocol: rows plus the rendered ``prompt``.

    Args:
        name: ``gen_<LLM-Adapters task>``.
        template: ``"chat"`` or ``"alpaca"`` (``riemann_zero.data.prompts.render_prompt``); from
            ``--metadata '{"template": ...}'`` on lm-eval's CLI, else ``DEFAULT_TEMPLATE``.
        pretrained: the model path (lm-eval passes its model arguments as metadata); its
            tokenizer renders the chat template.
        tokenizer: an explicit tokenizer path, preferred over ``pretrained``.
    """
    import datasets

    from riemann_zero.data.prompts import render_prompt

    template = template or DEFAULT_TEMPLATE
    tok = None
    if template == "chat":
        source = tokenizer or pretrained
        if source is None:
            raise ValueError("template 'chat' needs the model's tokenizer, but neither "
                             "'tokenizer' nor 'pretrained' is in the task metadata; pass "
                             "--metadata '{\"template\": \"alpaca\"}' or a 'pretrained' model")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
    rows = data.records(name)
    for row in rows:
        row["prompt"] = render_prompt(row["instruction"], template, tokenizer=tok)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def commonsense_gen_results(doc: dict, results: list[str]) -> dict[str, float]:
    """First-match extraction (``prompts.extract_answer``): accuracy and answered rate."""
    from riemann_zero.data.prompts import extract_answer

    pred = extract_answer(doc["task"], results[0])
    return {"acc": float(pred == doc["label"]), "answered": float(pred is not None)}


def obqa_question_stem(doc: dict) -> str:
    """lm-eval's OpenBookQA prompt is the bare question stem; ours is stored as OLMo's query."""
    text = doc["query"].strip()
    text = text[len("Question:"):] if text.startswith("Question:") else text
    text = text[: -len("Answer:")] if text.endswith("Answer:") else text
    return text.strip()


def winogrande_doc_to_text(doc: dict) -> int:
    """lm-eval's WinoGrande: partial evaluation, the context is the option index."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def gsm8k_fewshot() -> list[dict]:
    """The eight inline chain-of-thought exemplars of lm-eval's ``gsm8k-cot.yaml``."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    path = answers.lm_eval_task_file("gsm8k/gsm8k-cot.yaml")
    return yaml.load(path.read_text(), Loader=_Loader)["fewshot_config"]["samples"]


def minerva_fewshot() -> list[dict]:
    """lm-eval's four Minerva MATH exemplars."""
    return answers.literal_from_function("minerva_math/utils.py", "list_fewshot_samples")


def math_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Minerva exact match (strict "Final Answer" form) and a flexible last-``\\boxed{}`` match."""
    gold = answers.math_gold(doc["solution"])
    got = answers.math_answers(results[0])
    return {"exact_match": float(got["strict"] == gold),
            "flexible_match": float(got["flexible"] == gold)}


def mbpp_fewshot() -> list[dict]:
    """lm-eval's three MBPP prompt-split exemplars (task ids 2-4)."""
    return answers.literal_from_function("mbpp/utils.py", "list_fewshot_samples")


def humaneval_results(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of one greedy sample, executed in a sandboxed subprocess."""
    out = execution.run_program(execution.humaneval_program(doc, results[0]))
    return {"pass_at_1": float(out.passed)}


def mbpp_results(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 on the three ``test_list`` asserts, executed in a sandboxed subprocess."""
    out = execution.run_program(execution.mbpp_program(doc, results[0]))
    return {"pass_at_1": float(out.passed)}
