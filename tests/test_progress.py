"""What the user sees: stage lines with durations on rank 0 only, and library noise cut to what a
user needs unless ``log_level=debug`` asks for everything."""

from __future__ import annotations

import logging

import pytest

from riemann_zero.progress import configure_logging, stage


def test_stage_lines_on_rank_0_with_duration(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with stage("tokenising 3 examples"):
        pass
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[riemann_zero] tokenising 3 examples …"
    assert out[1].startswith("[riemann_zero] tokenising 3 examples: ") and out[1].endswith(" s")


def test_stage_is_silent_on_other_ranks_and_reports_failures(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with stage("quiet"):
        pass
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError), stage("loading"):
        raise RuntimeError("boom")
    assert "loading: failed after" in capsys.readouterr().out


def _records(name: str, messages: list[str]) -> list[str]:
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger(name)
    handler = Keep()
    log.addHandler(handler)
    log.propagate = False
    try:
        for m in messages:
            log.warning(m)
    finally:
        log.removeHandler(handler)
        log.filters.clear()
    return seen


def test_lm_eval_repetition_is_cut_at_info_and_kept_at_debug(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    noise = ["rz_gen_piqa: Custom kwargs can be passed to `--metadata` in console"] * 3
    repeated = ["Building contexts for rz_ll_piqa"] * 4
    configure_logging("info")
    assert _records("lm_eval.api.task", noise + repeated) == repeated[:1]
    configure_logging("debug")
    assert _records("lm_eval.api.task", noise + repeated) == noise + repeated


def test_deepspeed_info_only_on_rank_0(monkeypatch):
    log = logging.getLogger("DeepSpeed")
    old = log.level
    try:
        log.setLevel(logging.NOTSET)
        monkeypatch.setenv("RANK", "1")
        configure_logging("info")
        assert not log.isEnabledFor(logging.INFO) and log.isEnabledFor(logging.WARNING)
        log.setLevel(logging.NOTSET)
        monkeypatch.setenv("RANK", "0")
        configure_logging("info")
        assert log.isEnabledFor(logging.INFO)
    finally:
        log.setLevel(old)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="log_level must be one of"):
        configure_logging("loud")
