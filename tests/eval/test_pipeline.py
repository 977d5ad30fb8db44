"""End to end on the 4-layer SmolLM2 and a real adapter: scores, tables, charts, resume, stock CLI.

The default tests use two tasks per suite and few documents (the 2-core budget); the
``slow`` test runs every task of every suite at ``--limit 20``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import runner, suites

CS_TASKS = ["rz_ll_piqa", "rz_gen_piqa"]
BATCH = 32  # every limited document in one batch: fewer generate() calls on the CPU


@pytest.fixture(scope="module")
def commonsense(run_dir):
    return runner.evaluate(run_dir, "commonsense", limit=20, tasks=CS_TASKS, batch_size=BATCH)


def _samples(run_dir: Path, suite: str, label: str) -> dict[tuple[str, int], str]:
    path = run_dir / "eval" / f"samples_{suite}_{label}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["task"], r["doc_id"]): json.dumps(r["resps"]) for r in rows}


def _is_png(path: Path) -> bool:
    png = path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return png and path.stat().st_size > 2000


def test_commonsense_adapter_changes_scores(commonsense, run_dir):
    models = commonsense["suites"]["commonsense"]["models"]
    base, tuned = models["base"]["results"], models["smollm2-lora"]["results"]
    # Protocol (b): the base model never writes a label ("solution1"/"solution2"); the adapter,
    # trained on that format, answers every question, so its accuracy is that of its labels.
    assert base["rz_gen_piqa"]["answered,none"] == 0.0
    assert tuned["rz_gen_piqa"]["answered,none"] >= 0.9
    assert tuned["rz_gen_piqa"]["acc,none"] > base["rz_gen_piqa"]["acc,none"]
    # Protocol (a): the log-likelihoods the ranking rests on all move.
    b, t = _samples(run_dir, "commonsense", "base"), _samples(run_dir, "commonsense",
                                                               "smollm2-lora")
    ll = [k for k in b if k[0] == "rz_ll_piqa"]
    assert len(ll) == 20 and all(b[k] != t[k] for k in ll)


def test_results_json_md_and_png(commonsense, run_dir):
    out = run_dir / "eval"
    saved = json.loads((out / "results.json").read_text())
    assert saved["recipe"]["data"]["template"] == "chat"  # the adapter's recipe (run.json)
    assert saved["versions"]["lm_eval"].startswith("0.4")
    assert saved["suites"]["commonsense"]["models"]["base"]["n_samples"]["rz_ll_piqa"][
        "effective"] == 20
    md = (out / "results.md").read_text()
    assert "(a) lm-eval log-likelihood" in md and "(b) LLM-Adapters generative" in md
    assert "| base |" in md and "| smollm2-lora |" in md
    assert "**not comparable**" in md and "Riemannion r16 [Riemannion T1]" in md
    assert _is_png(out / "results_commonsense.png")


def test_resume_recomputes_only_missing_tasks(commonsense, run_dir, monkeypatch):
    cache = run_dir / "eval" / "cache" / "smollm2-lora" / "rz_ll_piqa.json"
    cache.unlink()  # as if the run had stopped before this task
    calls = []
    real = runner._run_task
    monkeypatch.setattr(runner, "_run_task",
                        lambda model, task, *a: calls.append((model.label, task)) or real(
                            model, task, *a))
    again = runner.evaluate(run_dir, "commonsense", limit=20, tasks=CS_TASKS, batch_size=BATCH)
    assert calls == [("smollm2-lora", "rz_ll_piqa")]
    prov = again["suites"]["commonsense"]["provenance"]
    assert prov["computed"] == ["smollm2-lora/rz_ll_piqa"] and len(prov["cached"]) == 3
    assert (again["suites"]["commonsense"]["models"]
            == commonsense["suites"]["commonsense"]["models"])  # greedy: same numbers


def test_stock_lm_eval_cli_gives_the_same_numbers(commonsense, run_dir, base_model, tmp_path):
    exe = Path(sys.executable).with_name("lm_eval")
    cmd = [str(exe), "--model", "hf",
           "--model_args", f"pretrained={base_model},peft={run_dir / 'adapter'},dtype=float32",
           "--tasks", ",".join(CS_TASKS), "--include_path", "eval/tasks",
           "--limit", "20", "--device", "cpu", "--batch_size", str(BATCH),
           "--output_path", str(tmp_path / "out")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    ours = commonsense["suites"]["commonsense"]["models"]["smollm2-lora"]["results"]
    for task in CS_TASKS:
        for metric in ("acc,none", "acc_norm,none", "answered,none"):
            if metric in ours[task]:
                assert stock[task][metric] == ours[task][metric], (task, metric)


# Few-shot prompts (GSM8K 8-shot, MATH 4-shot, MBPP 3-shot) cost ~1k tokens of prefill per
# document; the default run keeps one task per suite and 1-2 documents, the slow test all.
@pytest.mark.parametrize("suite,tasks", [("math", ["rz_gsm8k_cot"]), ("code", ["rz_humaneval"])])
def test_generative_suites_run_and_adapter_changes_outputs(suite, tasks, run_dir):
    res = runner.evaluate(run_dir, suite, limit=1 if suite == "math" else 2, tasks=tasks,
                          batch_size=BATCH,
                          max_gen_toks=32)["suites"][suite]
    for model in res["models"].values():
        for col in suites.SUITES[suite]:
            if col.task in tasks:
                assert 0.0 <= model["results"][col.task][col.metric] <= 1.0
    # The 4-layer model solves none of these; what the adapter must change is the text.
    b, t = _samples(run_dir, suite, "base"), _samples(run_dir, suite, "smollm2-lora")
    assert any(b[k] != t[k] for k in b)
    assert _is_png(run_dir / "eval" / f"results_{suite}.png")
    assert f"## {suite}" in (run_dir / "eval" / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["commonsense", "math", "code"])
def test_full_suites_limit_20(suite, run_dir, tmp_path):
    res = runner.evaluate(run_dir, suite, limit=20, batch_size=BATCH, max_gen_toks=128,
                          output_dir=tmp_path / "eval")["suites"][suite]
    assert set(res["tasks"]) == set(suites.suite_tasks(suite))
    b, t = _samples(tmp_path, suite, "base"), _samples(tmp_path, suite, "smollm2-lora")
    assert any(b[k] != t[k] for k in b)
    if suite == "commonsense":
        base, tuned = res["models"]["base"]["results"], res["models"]["smollm2-lora"]["results"]
        assert any(base[c.task][c.metric] != tuned[c.task][c.metric]
                   for c in suites.SUITES[suite])
    assert _is_png(tmp_path / "eval" / f"results_{suite}.png")
    assert (tmp_path / "eval" / "results.md").read_text().count("| base |") >= 1


def test_rerun_with_other_settings_keeps_earlier_results(commonsense, run_dir, tmp_path):
    results = run_dir / "eval" / "results.json"
    before = results.read_text()
    with pytest.raises(ValueError, match=r"already holds commonsense results computed with other "
                                         r"settings \(limit 20 there vs 3 now\); pass "
                                         r"--output-dir DIR to write beside them, or --overwrite"):
        runner.evaluate(run_dir, "commonsense", limit=3, tasks=CS_TASKS, batch_size=BATCH)
    assert results.read_text() == before
    beside = runner.evaluate(run_dir, "commonsense", limit=3, tasks=CS_TASKS, batch_size=BATCH,
                             output_dir=tmp_path / "limit3")
    assert beside["output_dir"] == str((tmp_path / "limit3").resolve())
    assert beside["suites"]["commonsense"]["limit"] == 3
    assert results.read_text() == before  # the first results are untouched


def test_cli_prints_the_real_paths_and_the_table(commonsense, run_dir):
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "eval", str(run_dir), "--suite", "commonsense",
                           "--limit", "20", "--tasks", ",".join(CS_TASKS),
                           "--batch-size", str(BATCH)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = (run_dir / "eval").resolve()
    assert f"wrote {out}/results.json, {out}/results.md" in proc.stdout
    wrote = next(ln for ln in proc.stdout.splitlines() if ln.startswith("wrote "))
    named = [Path(p) for p in wrote.removeprefix("wrote ").split(", ")]
    assert all(p.exists() for p in named), named
    assert {out / f"samples_commonsense_{label}.jsonl" for label in ("base", "smollm2-lora")} \
        <= set(named)
    assert "RUN_DIR" not in proc.stdout
    assert "| smollm2-lora |" in proc.stdout and "95 % interval" in proc.stdout
    assert "Answered (% of documents" in proc.stdout


def test_table_shows_intervals_and_answered_rate(commonsense, run_dir):
    md = (run_dir / "eval" / "results.md").read_text()
    res = commonsense["suites"]["commonsense"]
    tuned = res["models"]["smollm2-lora"]["results"]["rz_gen_piqa"]
    from eval.report import wilson

    low, high = wilson(tuned["acc,none"], 20)
    row = next(ln for ln in md.splitlines() if ln.startswith("| smollm2-lora |")
               and f"({100 * low:.0f}–{100 * high:.0f})" in ln)
    assert f"{100 * tuned['acc,none']:.1f}" in row
    answered = [ln for ln in md.split("Answered (% of documents")[1].splitlines()
                if ln.startswith("| base |")]
    assert answered and "0.0" in answered[0]  # the base model never writes a label
