"""Sandboxed code execution: correct code passes; looping or allocating code is killed, fails."""

from __future__ import annotations

import time

from eval import execution

HUMANEVAL_DOC = {
    "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
    "test": ("def check(candidate):\n    assert candidate(2, 3) == 5\n"
             "    assert candidate(-1, 1) == 0\n"),
    "entry_point": "add",
}
MBPP_DOC = {
    "test_list": ["assert square(3) == 9", "assert square(0) == 0", "assert square(-2) == 4"],
    "test_setup_code": "",
}


def test_correct_humaneval_completion_passes():
    prog = execution.humaneval_program(HUMANEVAL_DOC, "    return a + b\n")
    assert execution.run_program(prog, timeout_s=10).passed


def test_wrong_completion_fails():
    prog = execution.humaneval_program(HUMANEVAL_DOC, "    return a * b\n")
    res = execution.run_program(prog, timeout_s=10)
    assert not res.passed and res.status == "failed"
    assert "AssertionError" in res.stderr_tail


def test_mbpp_program_with_fence_and_done_marker():
    # Chat models wrap code in fences; MBPP completions may carry the [DONE] marker.
    completion = "```python\ndef square(x):\n    return x * x\n```\n[DONE]"
    assert execution.run_program(execution.mbpp_program(MBPP_DOC, completion)).passed


def test_infinite_loop_is_killed_and_fails():
    start = time.monotonic()
    res = execution.run_program("while True:\n    pass\n", timeout_s=2)
    elapsed = time.monotonic() - start
    assert not res.passed and res.status == "timeout"
    assert elapsed < 10  # killed at ~2 s; slack for a loaded machine


def test_sleeping_child_processes_are_killed_with_the_group():
    # A forked grandchild must not outlive the sample (it would keep the CPU busy).
    prog = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)\n"
    start = time.monotonic()
    res = execution.run_program(prog, timeout_s=2)
    assert not res.passed and time.monotonic() - start < 10


def test_unbounded_allocation_is_stopped_and_fails():
    prog = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n"
    start = time.monotonic()
    res = execution.run_program(prog, timeout_s=20, memory_mb=512)
    assert not res.passed and res.status == "memory", res
    assert time.monotonic() - start < 20  # stopped by the memory cap, not by the timeout


def test_single_huge_allocation_fails():
    res = execution.run_program("x = bytearray(64 * 2**30)\n", timeout_s=10, memory_mb=512)
    assert not res.passed and res.status == "memory"
