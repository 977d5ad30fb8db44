"""Command line: ``python -m riemann_zero.merge SRC1 SRC2 [SRC3 ...] --out DIR --method METHOD``.

Merges stock PEFT adapters of one base model into a new stock PEFT adapter folder (plus
``merge.json``); the maths and the methods are in :mod:`riemann_zero.adapters.merge`
(docs/design.md §9). A bad request exits with status 2 and one line naming the fix, before any work.

Examples::

    python -m riemann_zero.merge runs/a/adapter runs/b/adapter --out merged --method fixed_rank
    python -m riemann_zero.merge oft_a oft_b --out m --method orthofuse --t 0.6 --restore spectra
    python -m riemann_zero.merge runs/a/adapter runs/b/adapter --out m --method peft:svd --rank 8
"""

from __future__ import annotations

import argparse
import sys

from riemann_zero.adapters.merge import METHODS, RESTORE, MergeError, merge_adapters

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m riemann_zero.merge",
        description="Merge PEFT adapters of one base model: LoRA by cat, fixed_rank or PEFT's "
                    "own types; OFT/BOFT by geodesic or orthofuse.")
    p.add_argument("sources", nargs="+", help="stock PEFT adapter folders")
    p.add_argument("--out", required=True, help="output adapter folder (written atomically)")
    p.add_argument("--method", required=True, help=f"one of {list(METHODS)}")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="LoRA mixture weights, one per source (default: 1/k each)")
    p.add_argument("--rank", type=int, default=None,
                   help="output rank of fixed_rank and peft:*svd (default: largest source rank)")
    p.add_argument("--t", type=float, default=None,
                   help="position from the first source (0) to the second (1); default 0.5")
    p.add_argument("--restore", choices=list(RESTORE), default=None,
                   help="spectra: undo the shrinking that averaging causes (default none)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 and one line on stderr for a bad request)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = merge_adapters(args.sources, args.out, method=args.method, weights=args.weights,
                             rank=args.rank, t=args.t, restore=args.restore)
    except MergeError as err:
        print(f"python -m riemann_zero.merge: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (stock PEFT adapter + merge.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
