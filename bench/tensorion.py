"""Tensorion against Muon and AdamW: the paper's setting (a ConvNet, 4-D kernels) and an MoE LM.

Two experiments, one protocol (``--part conv`` / ``--part moe``; ``--part report`` only redraws):

1. **conv**: a 3-layer ConvNet on scikit-learn's bundled digits (1,797 real 8×8 handwritten
   digits shipped inside the scikit-learn wheel, ``sklearn.datasets.load_digits``: no download).
   Fixed split 1,197 train / 300 validation / 300 test. The three kernels (32×1×3×3, 32×32×3×3,
   64×32×3×3) are moved by the method; the classifier head and the biases by AdamW in every
   method (the usual Muon split; given to Tensorion as 1-D ``logical_shape`` groups). Methods:
   Tensorion offline and online, Muon (each kernel flattened to out × in·kh·kw, KellerJordan's
   ``view(len(p), -1)``: Tensorion with that 2-D ``logical_shape``), AdamW on everything.
2. **moe**: ``recipes/moe_tensorion.yaml`` (a from-scratch Qwen3-MoE with fused 3-D experts,
   only the experts trained, real text) through the driver: Tensorion (offline), per-expert Muon
   (``optimizer.options.per_slice=true``: each expert slice its own matrix) and AdamW
   (``recipes/moe_adamw.yaml``); held-out loss.

Protocol (both): seed 0 at every lr of the method's grid; the grid is extended by one ×3 step
while the best point (lowest final validation / held-out loss) sits on its edge, so the best is
strictly inside (conv: then refined by the two ×√3 neighbours of the best); then seeds 1 and 2
at the best lr; curves are the min–max band over the 3 seeds.
Every run is one JSON file (conv) or one driver run directory (moe) under ``OUT/runs``; finished
runs are skipped, so an interrupted benchmark continues. Writes ``OUT/tensorion.json``,
``OUT/tensorion.md`` (tables) and ``OUT/conv_curves.png`` / ``OUT/moe_curves.png``.

    python bench/tensorion.py --part conv      # a few minutes on one core
    python bench/tensorion.py --part moe       # 17 driver runs, about 47 min on a loaded CPU
    python bench/tensorion.py --part report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import riemann_zero as rz
from riemann_zero import io

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "tensorion"
SEEDS = (0, 1, 2)
MAX_EXTENSIONS = 3

# ---------------------------------------------------------------------------------------- conv
CONV_EPOCHS, CONV_BATCH = 20, 50
CONV_METHODS: dict[str, list[float]] = {  # starting lr grids (extended at an edge)
    "tensorion_offline": [3e-3, 1e-2, 3e-2, 1e-1],
    "tensorion_online": [3e-3, 1e-2, 3e-2, 1e-1],
    "muon_flat": [3e-3, 1e-2, 3e-2, 1e-1],
    "adamw": [1e-3, 3e-3, 1e-2, 3e-2],
}


def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits, pixel values / 16, in a fixed train/val/test split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return {"train": (x[600:], y[600:]), "val": (x[:300], y[:300]), "test": (x[300:600],
                                                                               y[300:600])}


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c3(nn.functional.max_pool2d(x, 2)))
        return self.head(x.mean(dim=(-2, -1)))


def conv_optimizer(method: str, model: ConvNet, lr: float) -> torch.optim.Optimizer:
    kernels = [model.c1.weight, model.c2.weight, model.c3.weight]
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Head and biases: AdamW inside Tensorion (a 1-D logical_shape routes a tensor there).
    rest = [{"params": [p], "logical_shape": (p.numel(),)}
            for n, p in model.named_parameters() if not n.endswith("weight") or n == "head.weight"]
    if method == "muon_flat":
        groups = [{"params": [k], "logical_shape": (k.shape[0], k[0].numel())} for k in kernels]
        unfolding = "offline"  # a matrix has one unfolding
    else:
        groups = [{"params": kernels}]
        unfolding = method.split("_")[1]
    return rz.Tensorion(groups + rest, lr=lr, weight_decay=0.0, unfolding=unfolding,
                        adamw_betas=(0.9, 0.999))


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return (float(nn.functional.cross_entropy(logits, y)),
            float((logits.argmax(-1) == y).float().mean()))


def conv_run(method: str, lr: float, seed: int, data: dict) -> dict:
    torch.manual_seed(seed)
    model = ConvNet()
    opt = conv_optimizer(method, model, lr)
    x, y = data["train"]
    curve = []
    t0 = time.perf_counter()
    for epoch in range(CONV_EPOCHS):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        train_loss = 0.0
        for i in range(0, len(y) - CONV_BATCH + 1, CONV_BATCH):
            idx = perm[i:i + CONV_BATCH]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_loss += float(loss.detach()) * CONV_BATCH
        val_loss, val_acc = _evaluate(model, *data["val"])
        test_loss, test_acc = _evaluate(model, *data["test"])
        curve.append({"epoch": epoch + 1, "train_loss": train_loss / (len(y) // CONV_BATCH
                                                                       * CONV_BATCH),
                      "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
                      "test_acc": test_acc})
    unf = None
    if isinstance(opt, rz.Tensorion):  # the unfolding each kernel ended with
        unf = [opt.named_state[n].get("unfolding") for n in opt.param_groups[0]["tensor_names"]]
    return {"method": method, "lr": lr, "seed": seed, "curve": curve,
            "final": curve[-1], "unfoldings": unf, "wall_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------- moe
MOE_RECIPES = {"tensorion": "moe_tensorion.yaml", "muon_per_expert": "moe_tensorion.yaml",
               "adamw": "moe_adamw.yaml"}
MOE_EXTRA = {"tensorion": [], "muon_per_expert": ["optimizer.options.per_slice=true"],
             "adamw": []}
MOE_METHODS: dict[str, list[float]] = {
    "tensorion": [3e-3, 1e-2, 3e-2],
    "muon_per_expert": [3e-3, 1e-2, 3e-2],
    "adamw": [3e-3, 1e-2, 3e-2],
}


# The recipe's budget cut for the 2-core benchmark machine (about 1.5 min per run).
MOE_BUDGET = ["max_steps=50", "train.eval_every=10", "data.eval_limit=32"]


def moe_run(method: str, lr: float, seed: int, out: Path, world: int) -> dict | None:
    run_dir = out / "runs" / "moe" / f"{method}_lr{lr:g}_s{seed}"
    overrides = [f"output_dir={run_dir}", f"optimizer.lr={lr}", f"seed={seed}", *MOE_BUDGET,
                 *MOE_EXTRA[method]]
    recipe = str(REPO / "recipes" / MOE_RECIPES[method])
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if world == 1:
        cmd = [sys.executable, "-m", "riemann_zero.train", recipe, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_port=0", "-m", "riemann_zero.train", recipe, *overrides]
    info = run_dir / "run.json"
    if not (info.is_file() and json.loads(info.read_text()).get("status") == "finished"):
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"moe run {run_dir.name} failed")
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in lines if r.get("eval_loss") is not None]
    run = json.loads(info.read_text())
    return {"method": method, "lr": lr, "seed": seed,
            "curve": [{"step": s, "eval_loss": e} for s, e in evals],
            "train_curve": [{"step": s, "loss": v} for s, v in train],
            "final": {"val_loss": evals[-1][1]}, "wall_s": run.get("wall_time_s")}


# ------------------------------------------------------------------------------------ protocol
def _cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    io.write_json(path, result)
    return result


def sweep(part: str, methods: dict[str, list[float]], run, out: Path,
          refine: bool = False) -> dict:
    """Seed 0 over each grid (extended at an edge until the best is inside; with ``refine`` the
    two ×√3 neighbours of the best are added), then the other seeds at the best lr.
    ``run(method, lr, seed)`` → result dict with ``final.val_loss``."""
    results: dict = {}
    for method, grid in methods.items():
        grid = sorted(grid)
        runs: dict[float, dict] = {}

        def run_all(lrs: list[float], method: str = method, runs: dict = runs) -> None:
            for lr in lrs:
                if lr not in runs:
                    path = out / "runs" / part / f"{method}_lr{lr:g}_s0.json"
                    runs[lr] = _cached(path, lambda m=method, lr=lr: run(m, lr, 0))
                    print(f"{part} {method} lr={lr:g} seed 0: val loss "
                          f"{runs[lr]['final']['val_loss']:.4f}", flush=True)

        for _ in range(MAX_EXTENSIONS + 1):
            run_all(grid)
            losses = [_score(runs[lr]) for lr in grid]
            best = losses.index(min(losses))
            if best == 0:
                grid = [grid[0] / 3] + grid
            elif best == len(grid) - 1:
                grid = grid + [grid[-1] * 3]
            else:
                break
        if refine and 0 < best < len(grid) - 1:  # the bracket's ends stay the worst points
            mid = grid[best]
            grid = sorted(grid + [float(f"{mid / 3 ** 0.5:.3g}"), float(f"{mid * 3 ** 0.5:.3g}")])
            run_all(grid)
            losses = [_score(runs[lr]) for lr in grid]
            best = losses.index(min(losses))
        best_lr = grid[best]
        seeds = [runs[best_lr]]
        for seed in SEEDS[1:]:
            path = out / "runs" / part / f"{method}_lr{best_lr:g}_s{seed}.json"
            seeds.append(_cached(path, lambda m=method, lr=best_lr, s=seed: run(m, lr, s)))
        results[method] = {
            "grid": {f"{lr:g}": _score(runs[lr]) for lr in grid},
            "best_lr": best_lr, "best_inside": 0 < best < len(grid) - 1,
            "seeds": seeds,
        }
    return results


def _score(run: dict) -> float:
    v = run["final"]["val_loss"]
    return v if v is not None and math.isfinite(v) else float("inf")


# -------------------------------------------------------------------------------------- report
def _band(ax, runs: list[dict], key: str, xkey: str, label: str) -> None:
    xs = [r[xkey] for r in runs[0]["curve"]]
    ys = torch.tensor([[r[key] for r in run["curve"]] for run in runs])
    ax.plot(xs, ys.mean(0), label=label)
    ax.fill_between(xs, ys.min(0).values, ys.max(0).values, alpha=0.25)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "conv" in results:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for method, res in results["conv"].items():
            label = f"{method} (lr {res['best_lr']:g})"
            _band(axes[0], res["seeds"], "test_loss", "epoch", label)
            _band(axes[1], res["seeds"], "test_acc", "epoch", label)
        axes[0].set(xlabel="epoch", ylabel="test loss", yscale="log",
                    title="ConvNet on digits: test loss (min–max, 3 seeds)")
        axes[1].set(xlabel="epoch", ylabel="test accuracy", ylim=(0.8, 1.0),
                    title="test accuracy (min–max, 3 seeds)")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "conv_curves.png", dpi=110)
    if "moe" in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, res in results["moe"].items():
            _band(ax, res["seeds"], "eval_loss", "step", f"{method} (lr {res['best_lr']:g})")
        ax.set(xlabel="optimizer step", ylabel="held-out loss",
               title="MoE experts (Qwen3-MoE, from scratch): held-out loss, 3 seeds")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "moe_curves.png", dpi=110)


def summary(results: dict) -> dict:
    table = {}
    for part, methods in results.items():
        if part not in ("conv", "moe"):
            continue
        for method, res in methods.items():
            finals = [s["final"] for s in res["seeds"]]
            key = "test_acc" if part == "conv" else "val_loss"
            vals = [f[key] for f in finals]
            row = {"best_lr": res["best_lr"], "best_inside": res["best_inside"],
                   f"{key}_mean": sum(vals) / len(vals), f"{key}_min": min(vals),
                   f"{key}_max": max(vals)}
            if part == "conv":
                losses = [f["test_loss"] for f in finals]
                row.update(test_loss_mean=sum(losses) / len(losses), test_loss_min=min(losses),
                           test_loss_max=max(losses))
            table[f"{part}/{method}"] = row
    return table


def tables(results: dict) -> str:
    """Markdown tables of both parts (what BENCHMARKS.md quotes)."""
    lines = []
    for part, key, name in (("conv", "test_acc", "test accuracy %"),
                            ("moe", "val_loss", "held-out loss")):
        if part not in results:
            continue
        extra = " | test loss" if part == "conv" else ""
        lines += [f"| method | lr (seed-0 sweep: final validation loss) | {name}{extra} |",
                  "|---|---|---|" + ("---|" if part == "conv" else "")]
        for method, res in results[part].items():
            row = results["summary"][f"{part}/{method}"]
            grid = ", ".join(f"{lr}: {v:.3f}" for lr, v in sorted(
                res["grid"].items(), key=lambda kv: float(kv[0])))
            scale = 100 if part == "conv" else 1
            fmt = ".1f" if part == "conv" else ".3f"
            cell = (f"{row[key + '_mean'] * scale:{fmt}} [{row[key + '_min'] * scale:{fmt}}, "
                    f"{row[key + '_max'] * scale:{fmt}}]")
            if part == "conv":
                cell += (f" | {row['test_loss_mean']:.3f} [{row['test_loss_min']:.3f}, "
                         f"{row['test_loss_max']:.3f}]")
            lines.append(f"| {method} | **{res['best_lr']:g}** ({grid}) | {cell} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("conv", "moe", "report"), required=True)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--world", type=int, default=1, help="processes per MoE run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    path = out / "tensorion.json"
    part: dict = {}
    if args.part == "conv":
        data = digits()
        part = sweep("conv", CONV_METHODS, lambda m, lr, s: conv_run(m, lr, s, data), out,
                     refine=True)
    elif args.part == "moe":
        part = sweep("moe", MOE_METHODS,
                     lambda m, lr, s: moe_run(m, lr, s, out, args.world), out)
    # Read back just before writing: the two parts may run at the same time.
    results = json.loads(path.read_text()) if path.is_file() else {}
    if part:
        results[args.part] = part
    results["summary"] = summary(results)
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(),
                          "python": sys.version.split()[0],
                          "versions": io.versions()}
    io.write_json(path, results)
    plot(results, out)
    io.write_text_atomically(out / "tensorion.md", tables(results))
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
