"""Mutation audit: break the implementation on purpose, run the default tests that claim to guard
it, and check that at least one of them fails.

``python tests/mutations.py`` applies each mutation of :data:`MUTATIONS` to a throw-away copy of
this working tree (under a temporary folder; the tree it runs from is never modified), runs that
mutation's tests there with the copy first on ``PYTHONPATH``, and prints a table mutation →
outcome of each test. ``--only ID [ID ...]`` runs some, ``--list`` lists them, ``--baseline``
also runs every named test on an unmutated copy (all must pass), ``--report FILE`` writes the
table as Markdown, ``--keep`` leaves the copies. Exit status 1 if a mutation survives (no test
failed), if a mutation no longer applies (its text is gone: update it after a refactor), or if a
baseline test fails. tests/mutations.md describes each mutation and holds the last table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info",
                              ".ruff_cache")


@dataclass(frozen=True)
class Mutation:
    id: str
    what: str  # the fault, in words
    path: str  # file, relative to the repository root
    old: str  # text that must occur exactly once in it
    new: str
    tests: tuple[str, ...]  # default tests (pytest node ids) of which at least one must fail


MUTATIONS = [
    Mutation(
        "hf-resume-dropped", "riemann_zero.hf.Trainer drops resume_from_checkpoint (restarts)",
        "riemann_zero/hf/trainer.py",
        "return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial",
        "return super().train(resume_from_checkpoint=None, trial=trial",
        ("tests/hf/test_hf_trainer.py::test_resume_after_kill_continues_exactly",)),
    Mutation(
        "driver-skips-loading", "the driver ignores the checkpoint it found (a restart that "
        "still prints 'resumed from')",
        "riemann_zero/train/loop.py",
        "    plan = run.plan\n    if plan.resume_from is None:\n        return 0\n",
        "    plan = run.plan\n    if plan.resume_from is not None:\n"
        "        say(f\"resumed from {plan.resume_from}\")\n    return 0\n",
        ("tests/train/test_resume.py::test_resume_after_kill_matches_uninterrupted_run"
         "[riemannion_loi]",
         "tests/train/test_resume.py::test_two_process_resume_on_the_two_layer_model")),
    Mutation(
        "export-loi-sign", "the exported adapter adds LOI's ΔW₀ instead of subtracting it",
        "riemann_zero/adapters/export.py",
        "blocks_a.append(-full_tensor(ad.module.loi_A0)",
        "blocks_a.append(full_tensor(ad.module.loi_A0)",
        ("tests/distributed/test_engines.py::test_zero3_adapter_loads_in_stock_peft",)),
    Mutation(
        "divergence-check-removed", "the driver no longer checks the trainable tensors after "
        "each update (only the loss)",
        "riemann_zero/train/loop.py",
        "    if result.bad_tensors:  # the update itself is poisoned",
        "    if False:  # the update itself is poisoned",
        ("tests/train/test_failures.py::test_divergence_stops_the_run_and_keeps_the_newest_"
         "finite_checkpoint[riemannion_zero0-opts1-non-finite values in]",)),
    Mutation(
        "sandbox-kills-child-only", "the code sandbox kills its child, not the process group "
        "(grandchildren survive)",
        "eval/execution.py",
        "os.killpg(proc.pid, signal.SIGKILL)",
        "os.kill(proc.pid, signal.SIGKILL)",
        ("tests/eval/test_execution.py::test_sleeping_child_processes_are_killed_with_the_group",
         )),
    Mutation(
        "rss-kb-as-mib", "peak_rss_mib reports kB as MiB",
        "riemann_zero/io.py",
        "return int(line.split()[1]) / 1024  # kB",
        "return int(line.split()[1])  # kB",
        ("tests/train/test_partitioned_load.py::test_peak_rss_grows_with_touched_memory",)),
    Mutation(
        "riemannion-never-moves", "Riemannion's step leaves every point where it is (the "
        "reference run of the Trainer test no longer moves)",
        "riemann_zero/optim/riemannion.py",
        "span.truncate(sp, decay * c_x - lr_step * c_d,",
        "span.truncate(sp, decay * c_x - 0.0 * lr_step * c_d,",
        ("tests/hf/test_hf_trainer.py::test_trainer_equals_plain_loop[1]",)),
    Mutation(
        "manifold-step-twice", "the manifold optimizer steps twice per step() and reports the "
        "bytes of the last one",
        "riemann_zero/optim/base.py",
        "                stepped |= self._step_group(group, comm)\n",
        "                self._step_group(group, Counter())\n"
        "                stepped |= self._step_group(group, comm)\n",
        ("tests/distributed/test_engines.py::test_step_bytes_match_shape_prediction[zero3_gas4]",
         )),
    Mutation(
        "tensorion-owner-rank0", "Tensorion computes every tensor's direction on rank 0 "
        "(no round robin)",
        "riemann_zero/optim/tensorion.py",
        "owner = i % world\n            if world == 1 or piece.whole:",
        "owner = 0\n            if world == 1 or piece.whole:",
        ("tests/distributed/test_tensorion_engines.py::test_world3_has_a_rank_that_owns_nothing",
         )),
    Mutation(
        "ns-coefficient-typo", "a digit swapped in the Newton–Schulz coefficients",
        "riemann_zero/linalg.py",
        "NS_COEFFS = (3.4445, -4.7750, 2.0315)",
        "NS_COEFFS = (3.4445, -4.7750, 2.0351)",
        ("tests/test_geometry.py::test_ortho_newton_schulz_is_odd_polynomial_of_singular_values"
         "[seed0-20x12r3]",)),
    Mutation(
        "tensorboard-writes-flags", "boolean flags (skipped) become TensorBoard scalars",
        "riemann_zero/train/tracking.py",
        "isinstance(v, (int, float)) and not isinstance(v, bool)",
        "isinstance(v, (int, float))",
        ("tests/train/test_tracking.py::test_trackers_write_scalars_and_purge_on_resume",)),
    Mutation(
        "reference-polar-cut", "the dense oracle's polar drops every direction below half the "
        "largest singular value (the step and a test restating it agree with each other)",
        "riemann_zero/manifold/reference.py",
        "keep = (s > eps * s[0]) if s[0] > 0",
        "keep = (s > 0.5 * s[0]) if s[0] > 0",
        ("tests/test_reference.py::test_riemannion_step_basic_properties[raw]",
         "tests/test_reference.py::test_riemannion_step_basic_properties[paper]")),
    Mutation(
        "span-transport-unprojected", "the fused step's momentum transport keeps the part "
        "along the new U (no projection onto the new tangent space)",
        "riemann_zero/manifold/span.py",
        "    du = (eye - w1 @ w1.mT) @ c @ z1\n",
        "    du = c @ z1\n",
        ("tests/test_span.py::test_fused_step_is_the_dense_riemannion_step[seed0-20x12r3-raw]",)),
]


def _copy(dest: Path) -> Path:
    shutil.copytree(REPO, dest, ignore=SKIP, symlinks=True)
    return dest


def _apply(tree: Path, mut: Mutation) -> str | None:
    """Apply the mutation in ``tree``; an error message if its text is not there exactly once."""
    path = tree / mut.path
    text = path.read_text()
    count = text.count(mut.old)
    if count != 1:
        return f"{mut.path}: the text to mutate occurs {count} times (expected 1)"
    path.write_text(text.replace(mut.old, mut.new))
    return None


def _run_tests(tree: Path, tests: tuple[str, ...], timeout: int) -> dict[str, str]:
    """{node id: passed | failed | error | skipped | missing} of ``tests`` run in ``tree``."""
    xml = tree / ".mutation-junit.xml"
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           f"--junitxml={xml}", *tests]
    try:
        subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {t: "timeout" for t in tests}
    outcome = {t: "missing" for t in tests}
    if not xml.exists():
        return outcome
    for case in ET.parse(xml).getroot().iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        node = f"{file}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        status = ("failed" if "failure" in kinds else "error" if "error" in kinds
                  else "skipped" if "skipped" in kinds else "passed")
        bad = kinds.get("failure", kinds.get("error"))
        if bad is not None:  # the first line of the message: which assertion caught it
            first = (bad.get("message") or "").strip().splitlines()[:1]
            if first:
                status += ": " + first[0][:120].replace("|", "/")
        for t in tests:
            if t == node or t.split("/", 1)[-1] == node or t.endswith("::" + case.get("name")):
                outcome[t] = status
    return outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--baseline", action="store_true",
                    help="first run every named test on an unmutated copy")
    ap.add_argument("--report", type=Path, help="write the table (Markdown) to this file")
    ap.add_argument("--keep", action="store_true", help="keep the copies")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per mutation")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.id}: {m.what}\n    {m.path}\n    " + "\n    ".join(m.tests))
        return 0
    work = Path(tempfile.mkdtemp(prefix="rz-mutations-"))
    rows, bad = [], False
    try:
        if args.baseline:
            tree = _copy(work / "baseline")
            tests = tuple(t for m in chosen for t in m.tests)
            res = _run_tests(tree, tests, args.timeout * 2)
            for t, status in res.items():
                print(f"baseline {status:8s} {t}", flush=True)
                bad |= status != "passed"
        for m in chosen:
            tree = _copy(work / m.id)
            start = time.monotonic()
            problem = _apply(tree, m)
            if problem:
                print(f"{m.id}: DOES NOT APPLY: {problem}", flush=True)
                rows.append((m, {t: "not applied" for t in m.tests}, 0.0))
                bad = True
                continue
            res = _run_tests(tree, m.tests, args.timeout)
            rows.append((m, res, time.monotonic() - start))
            killed = any(s.startswith(("failed", "error")) for s in res.values())
            bad |= not killed
            print(f"{m.id}: {'caught' if killed else 'SURVIVED'} "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
            for t, status in res.items():
                print(f"    {status:8s} {t}", flush=True)
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = ["| mutation | file | default test | outcome |", "|---|---|---|---|"]
    for m, res, _ in rows:
        for t, status in res.items():
            table.append(f"| `{m.id}`: {m.what} | `{m.path}` | `{t}` | {status} |")
    print("\n".join(table))
    if args.report:
        args.report.write_text("\n".join(table) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
