"""Sandboxed code execution: correct code passes; looping or allocating code is killed, fails."""

from __future__ import annotations

import os
import signal
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


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_sleeping_child_processes_are_killed_with_the_group(tmp_path):
    """A forked grandchild must not outlive the sample (it would keep the CPU busy): the program
    forks, the grandchild writes its pid and sleeps; after run_program returns it is gone (killed
    with the sandbox's process group, not only the child run_program started)."""
    pid_file = tmp_path / "grandchild.pid"
    prog = ("import os, time\n"
            "if os.fork() == 0:\n"
            f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n"
            "time.sleep(60)\n")
    start = time.monotonic()
    res = execution.run_program(prog, timeout_s=2)
    assert not res.passed and time.monotonic() - start < 10
    pid = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 5  # SIGKILL is asynchronous: allow it a moment
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the grandchild outlived the sample"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_unbounded_allocation_is_stopped_and_fails():
    prog = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n"
    start = time.monotonic()
    res = execution.run_program(prog, timeout_s=20, memory_mb=512)
    assert not res.passed and res.status == "memory", res
    assert time.monotonic() - start < 20  # stopped by the memory cap, not by the timeout


def test_single_huge_allocation_fails():
    res = execution.run_program("x = bytearray(64 * 2**30)\n", timeout_s=10, memory_mb=512)
    assert not res.passed and res.status == "memory"
