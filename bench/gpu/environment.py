"""GPU kit, part 0: what ran the kit — device, driver, CUDA, NCCL, torch and package versions.

    python bench/gpu/environment.py --out OUT/env.json [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PACKAGES = ("riemann-zero", "torch", "deepspeed", "transformers", "peft", "accelerate",
            "tokenizers", "safetensors", "huggingface-hub", "numpy", "pydantic", "pyyaml",
            "datasets", "lm-eval", "triton")


def _nvidia_smi() -> dict:
    query = "name,driver_version,memory.total,power.limit,clocks.max.sm"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return {"error": f"nvidia-smi: {err}"}
    rows = [dict(zip(query.split(","), (v.strip() for v in line.split(","))))
            for line in out.stdout.strip().splitlines()]
    return {"gpus": rows} if rows else {"error": out.stderr.strip()[-300:] or "no output"}


def describe(dry_run: bool) -> dict:
    import importlib.metadata as md

    import torch

    versions = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    out = {
        "dry_run": dry_run,
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "commit": _commit(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "skipped_in_dry_run": (["CUDA", "NCCL", "bf16 autocast (the driver trains in fp32)"]
                               if dry_run else []),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["device"] = {"name": props.name, "count": torch.cuda.device_count(),
                         "capability": f"{props.major}.{props.minor}",
                         "memory_gib": round(props.total_memory / 2**30, 1),
                         "multiprocessors": props.multi_processor_count}
        out["cudnn"] = torch.backends.cudnn.version()
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:  # NCCL missing from this build: say so, keep going
            out["nccl"] = f"unavailable: {err}"
        out["nvidia_smi"] = _nvidia_smi()
    else:
        out["device"] = {"name": f"CPU ({platform.processor() or platform.machine()})",
                         "count": 0}
    return out


def _commit() -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(common.REPO), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None  # the device gets a copy of the tree without .git


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    result = describe(args.dry_run)
    args.out.write_text(json.dumps(result, indent=1))
    dev = result["device"]
    print(f"[env] {dev['name']} x{dev['count']}; torch {result['versions']['torch']} "
          f"(CUDA {result['torch_cuda']}); deepspeed {result['versions']['deepspeed']}; "
          f"transformers {result['versions']['transformers']}; peft {result['versions']['peft']}")


if __name__ == "__main__":
    main()
