"""Merging adapters on real tasks, and the scale of the factored LoRA merge.

Quality (default): SmolLM2-135M-Instruct, two adapters per family trained by the driver on two
different tasks (BoolQ and PIQA train splits of the commonsense mixture, protocol (b) prompts),
LoRA (AdamW, r = 8, all linear modules) and OFT (AdamW, block 32, Cayley–Neumann):

1. train the four singles (``python -m riemann_zero.train ...``; a finished run is kept);
2. merge each pair with every method (``riemann_zero.merge_adapters``; a finished merge is kept);
3. score base, singles and merges on both tasks with the eval stage (``python -m eval``,
   protocol (b) generative, ``--limit`` documents per task; its per-task cache resumes);
4. write ``OUT/merge.json``, ``OUT/merge.md`` (table) and ``OUT/merge.png``.

The report never replaces results with less: when ``OUT/merge.json`` holds a row, a distance, an
angle, a merge's statistics or a merge time that this report could not compute (on a fresh clone
the runs and merges behind the committed results are absent), it writes nothing and exits 2
naming what would be lost; ``--out DIR`` writes the report elsewhere, ``--force`` replaces them.

Scale (``--scale``): two random r = 16 LoRA adapters with Llama-3-8B shapes (32 layers × q, k, v,
o, gate, up, down = 224 target modules): time and peak RSS of ``fixed_rank`` on all 224 modules
against PEFT's ``svd`` combination type (``add_weighted_adapter``, which builds each dense ΔW and
takes its SVD) on ``--peft-layers`` decoder layers, extrapolated per layer; each in a fresh
subprocess so that peak RSS is its own. Writes ``OUT/scale.json``.

    python bench/merge.py                  # quality: ~45 min of one CPU core, resumable
    python bench/merge.py --report-only    # table and plot from what is finished (never less
                                           # than OUT/merge.json already holds)
    python bench/merge.py --no-eval; python bench/merge.py --only "lora cat,oft geodesic" &
                                           # merges once, then evaluations in parallel
    python bench/merge.py --scale          # scale figures (~5 min)
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

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "merge"
TASKS = ("boolq", "piqa")
LORA_RECIPE = "recipes/smollm2_commonsense_adamw.yaml"
STEPS = {"boolq": 60, "piqa": 15}  # LoRA optimizer steps of 8 examples (OFT: its recipes, 15)
LORA_OVERRIDES = ["eval_after=null", "train.eval_every=0", "train.save_every=30",
                  "data.eval_limit=0", "deepspeed.zero_optimization.stage=0",
                  "train.micro_batch_size=8", "data.max_length=256"]

TIMINGS = "seconds.json"  # under OUT/work/merged: each merge's wall time, as it ran

# name -> (family, method, kwargs of merge_adapters). t is the position from the BoolQ adapter
# (t = 0) to the PIQA adapter (t = 1); for LoRA it stands for the weights (1 − t, t).
MERGES: dict[str, tuple[str, str, dict]] = {  # in the order they are evaluated
    "lora fixed_rank": ("lora", "fixed_rank", {"t": 0.5}),
    "lora cat": ("lora", "cat", {"t": 0.5}),
    "lora peft:svd": ("lora", "peft:svd", {"t": 0.5}),
    "lora peft:linear": ("lora", "peft:linear", {"t": 0.5}),
    "oft orthofuse": ("oft", "orthofuse", {"t": 0.5}),
    "oft orthofuse +spectra": ("oft", "orthofuse", {"t": 0.5, "restore": "spectra"}),
    "oft geodesic": ("oft", "geodesic", {"t": 0.5}),
    "lora fixed_rank +spectra": ("lora", "fixed_rank", {"t": 0.5, "restore": "spectra"}),
    "oft geodesic +spectra": ("oft", "geodesic", {"t": 0.5, "restore": "spectra"}),
    "lora peft:ties_svd": ("lora", "peft:ties_svd", {"t": 0.5}),
    "oft orthofuse +spectra t=0.3": ("oft", "orthofuse", {"t": 0.3, "restore": "spectra"}),
    "oft orthofuse +spectra t=0.7": ("oft", "orthofuse", {"t": 0.7, "restore": "spectra"}),
    "lora fixed_rank t=0.3": ("lora", "fixed_rank", {"t": 0.3}),
    "lora fixed_rank t=0.7": ("lora", "fixed_rank", {"t": 0.7}),
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _finished(run: Path) -> bool:
    path = run / "run.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "finished"


def train(out: Path, skip: bool = False) -> dict[str, Path]:
    """The four single adapters (LoRA and OFT on each task); finished runs are kept (``skip``:
    train nothing, only name them)."""
    runs = {}
    for family in ("lora", "oft"):
        for task in TASKS:
            run = out / "runs" / f"{family}_{task}"
            runs[f"{family} {task}"] = run / "adapter"
            if skip or _finished(run):
                continue
            if family == "lora":
                cmd = [LORA_RECIPE, f"data.train=commonsense:{task}", f"max_steps={STEPS[task]}",
                       *LORA_OVERRIDES]
            else:
                cmd = [f"recipes/smollm2_{task}_oft.yaml", "eval_after=null"]
            print(f"[merge bench] training {family} on {task}", flush=True)
            subprocess.run([sys.executable, "-m", "riemann_zero.train", *cmd,
                            f"output_dir={run}"], cwd=REPO, env=_env(), check=True)
    return runs


def merge_all(out: Path, singles: dict[str, Path]) -> dict[str, Path]:
    from riemann_zero import merge_adapters

    merged = {}
    for name, (family, method, kwargs) in MERGES.items():
        path = out / "work" / "merged" / _slug(name)
        merged[name] = path
        sources = [singles[f"{family} {t}"] for t in TASKS]
        if (path / "merge.json").is_file():
            continue
        if not all((s / "adapter_config.json").is_file() for s in sources):
            print(f"[merge bench] {name}: sources not trained yet, skipped", flush=True)
            continue
        start = time.perf_counter()
        merge_adapters(sources, path, method=method, **kwargs)
        seconds = time.perf_counter() - start
        print(f"[merge bench] merged {name} in {seconds:.1f} s", flush=True)
        timings = out / "work" / "merged" / TIMINGS
        recorded = json.loads(timings.read_text()) if timings.is_file() else {}
        timings.write_text(json.dumps({**recorded, name: seconds}, indent=1))
    return merged


def evaluate(out: Path, models: dict[str, Path], limit: int) -> None:
    """The eval stage on every model (protocol (b), both tasks); cached per model and task."""
    tasks = ",".join(f"rz_gen_{t}" for t in TASKS)
    for name, adapter in models.items():
        dest = out / "work" / "eval" / _slug(name)
        if (dest / "results.json").is_file():
            continue
        print(f"[merge bench] eval {name}", flush=True)
        cmd = [sys.executable, "-m", "eval", str(adapter), "--suite", "commonsense", "--tasks",
               tasks, "--limit", str(limit), "--batch-size", "50", "--output-dir", str(dest)]
        if name != "lora boolq":  # the base row comes with the first model only
            cmd.append("--no-base")
        subprocess.run(cmd, cwd=REPO, env=_env(), check=True)


def _scores(path: Path) -> dict[str, dict[str, float]]:
    """{model label: {task: acc}} from an eval stage results.json."""
    models = json.loads(path.read_text())["suites"]["commonsense"]["models"]
    rows = {}
    for label, entry in models.items():
        res = entry["results"]
        rows["base" if label == "base" else "adapter"] = {
            t: res[f"rz_gen_{t}"]["acc,none"] for t in TASKS if f"rz_gen_{t}" in res}
    return rows


def _lora_delta_gaps(out: Path) -> dict[str, dict[str, float]]:
    """‖ΔW − ΔW_cat‖/‖ΔW_cat‖ per module (max, mean) of each merged LoRA adapter against the
    exact average (``lora cat``): how far each rank-8 merge is from Σ wᵢΔWᵢ."""
    import torch
    from safetensors.torch import load_file

    def deltas(path: Path) -> dict[str, torch.Tensor]:
        t = load_file(str(path / "adapter_model.safetensors"))
        cfg = json.loads((path / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / cfg["r"]
        return {k.split(".lora_A.")[0]: s * (t[k.replace(".lora_A.", ".lora_B.")].double()
                                             @ t[k].double()) for k in t if ".lora_A." in k}

    root = out / "work" / "merged"
    if not (root / _slug("lora cat") / "merge.json").is_file():
        return {}
    exact = deltas(root / _slug("lora cat"))
    gaps = {}
    for name, (family, _, kwargs) in MERGES.items():
        path = root / _slug(name)
        if family != "lora" or name == "lora cat" or kwargs.get("t", 0.5) != 0.5 \
                or "weights" in kwargs or not (path / "merge.json").is_file():
            continue
        d = deltas(path)
        rel = [float((d[k] - exact[k]).norm() / exact[k].norm()) for k in exact]
        gaps[name] = {"max": max(rel), "mean": sum(rel) / len(rel)}
    return gaps


def _oft_angles(out: Path) -> dict[str, float]:
    """Mean |rotation angle| (radians) over all blocks of every OFT adapter (singles read in
    their Cayley–Neumann convention, merges in the exact one): the shrinking that averaging
    causes and what restoration gives back."""
    import torch
    from safetensors.torch import load_file

    paths = {f"oft {t}": out / "runs" / f"oft_{t}" / "adapter" for t in TASKS}
    paths.update({n: out / "work" / "merged" / _slug(n) for n, (f, _, _) in MERGES.items()
                  if f == "oft"})
    result = {}
    for name, path in paths.items():
        if not (path / "adapter_config.json").is_file():
            continue
        neumann = json.loads((path / "adapter_config.json").read_text())["use_cayley_neumann"]
        vecs = [v for k, v in load_file(str(path / "adapter_model.safetensors")).items()
                if k.endswith("oft_R.weight")]
        vec = torch.cat(vecs).double()
        b = int(round((1 + (1 + 8 * vec.shape[-1]) ** 0.5) / 2))
        rows, cols = torch.triu_indices(b, b, 1)
        s = vec.new_zeros(vec.shape[0], b, b)
        s[:, rows, cols] = vec
        s = (s - s.mT) * (-1 if neumann else 1)  # PEFT's two conventions (docs/design.md §9)
        eye = torch.eye(b, dtype=s.dtype)
        rot = torch.linalg.solve(eye + s, eye - s, left=False)  # (I − S)(I + S)⁻¹
        result[name] = float(torch.angle(torch.linalg.eigvals(rot)).abs().mean())
    return result


def losses(old: dict, new: dict) -> list[str]:
    """What ``old`` (a merge.json) holds that ``new`` lacks: rows, a row's tasks, distances,
    angles, merge statistics and merge times, each named as ``section/key``."""
    lost = []
    for section in ("rows", "lora_delta_gap_vs_cat", "oft_mean_abs_angle", "merge_stats",
                    "merge_seconds"):
        before, after = old.get(section) or {}, new.get(section) or {}
        for key, value in before.items():
            if key not in after:
                lost.append(f"{section}/{key}")
            elif section == "rows":
                lost += [f"rows/{key}/{t}" for t in value if t not in after[key]]
    if old.get("limit") not in (None, new.get("limit")):
        lost.append(f"limit {old['limit']} (this report: {new.get('limit')})")
    return lost


class WouldLoseResults(Exception):
    """The report would replace results with fewer (see :func:`losses`)."""


def report(out: Path, models: dict[str, Path], limit: int, force: bool = False) -> dict:
    """Write merge.json, merge.md and merge.png from the finished evaluations and merges.

    Raises:
        WouldLoseResults: ``out/merge.json`` holds results this report lacks (``force`` not
            given); nothing is written then.
    """
    rows: dict[str, dict[str, float]] = {}
    for name in models:
        path = out / "work" / "eval" / _slug(name) / "results.json"
        if not path.is_file():
            continue
        for label, scores in _scores(path).items():
            rows["base" if label == "base" else name] = scores
    record = {"limit": limit, "tasks": list(TASKS), "rows": rows,
             "merges": {k: {"family": f, "method": m, **kw} for k, (f, m, kw) in MERGES.items()},
             "machine": platform.processor() or platform.machine(),
             "lora_delta_gap_vs_cat": _lora_delta_gaps(out),
             "oft_mean_abs_angle": _oft_angles(out),
             "merge_stats": {n: json.loads((out / "work" / "merged" / _slug(n) / "merge.json")
                                           .read_text())["stats"] for n in MERGES
                             if (out / "work" / "merged" / _slug(n) / "merge.json").is_file()}}
    timings = out / "work" / "merged" / TIMINGS
    if timings.is_file():
        record["merge_seconds"] = json.loads(timings.read_text())
    previous = out / "merge.json"
    lost = losses(json.loads(previous.read_text()), record) if previous.is_file() else []
    if lost and not force:
        shown = ", ".join(lost[:6]) + (f" and {len(lost) - 6} more" if len(lost) > 6 else "")
        raise WouldLoseResults(
            f"{previous} holds {len(lost)} results this report lacks ({shown}): the runs behind "
            f"them are not under {out}/work and {out}/runs; nothing written. Pass --out DIR to "
            f"write this report elsewhere, or --force to replace them")
    from riemann_zero import io

    io.write_json(out / "merge.json", record)
    lines = table(rows, list(models))
    (out / "merge.md").write_text(
        f"Protocol (b) generative accuracy, {limit} documents per task (SmolLM2-135M-Instruct)."
        "\n\n" + "\n".join(lines) + "\n")
    _plot(out, rows)
    print("\n".join(lines))
    return record


def table(rows: dict[str, dict[str, float]], names: list[str]) -> list[str]:
    """The Markdown table (lines) that merge.md and BENCHMARKS.md show: base first, then every
    name of ``names`` that has a row, in that order."""
    lines = ["| model | BoolQ | PIQA | mean |", "|---|---|---|---|"]
    for name in ["base", *[n for n in names if n != "base"]]:
        if name not in rows:
            continue
        b, p = rows[name].get("boolq"), rows[name].get("piqa")
        mean = (b + p) / 2 if b is not None and p is not None else None
        lines.append(f"| {name} | {fmt(b)} | {fmt(p)} | {fmt(mean)} |")
    return lines


def model_names() -> list[str]:
    """Every model of the benchmark in report order: the four singles, then the merges."""
    return [f"{f} {t}" for f in ("lora", "oft") for t in TASKS] + list(MERGES)


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _plot(out: Path, rows: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.5))
    for name, s in rows.items():
        if "boolq" not in s or "piqa" not in s:
            continue
        color = "black" if name == "base" else ("tab:blue" if name.startswith("lora") else
                                               "tab:orange")
        marker = "s" if name == "base" or name.endswith(("boolq", "piqa")) else "o"
        ax.scatter(s["boolq"], s["piqa"], color=color, marker=marker, s=40)
        ax.annotate(name, (s["boolq"], s["piqa"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("BoolQ accuracy (protocol b)")
    ax.set_ylabel("PIQA accuracy (protocol b)")
    ax.set_title("Merging a BoolQ adapter with a PIQA adapter (blue LoRA, orange OFT;\n"
                 "squares: base and the single adapters)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "merge.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ scale
# Llama-3-8B: hidden 4096, 32 heads / 8 KV heads of 128, intermediate 14336, 32 layers.
LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
             "o_proj": (4096, 4096), "gate_proj": (14336, 4096), "up_proj": (14336, 4096),
             "down_proj": (4096, 14336)}
SCALE_CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
method, layers, rank, src = sys.argv[1], int(sys.argv[2]), 16, Path(sys.argv[4])
shapes = json.loads(sys.argv[3])

def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

if method == "fixed_rank":
    from riemann_zero import merge_adapters
    import torch  # noqa: F811  (loaded before the measurement)
    reset_peak()
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    merge_adapters([src / "a", src / "b"], src / "merged", method="fixed_rank", rank=rank)
    wall = time.perf_counter() - start
else:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    gen = torch.Generator().manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=256)
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
    base = base.to_empty(device="cpu").to(torch.bfloat16)  # weights unused by the svd type
    lc = LoraConfig(r=rank, lora_alpha=32, target_modules=list(shapes))
    model = get_peft_model(base, lc, adapter_name="a")
    model.add_adapter("b", lc)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    reset_peak()
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="svd",
                               svd_rank=rank)
    wall = time.perf_counter() - start
print(json.dumps({"method": method, "layers": layers, "modules": layers * len(shapes),
                  "seconds": wall, "peak_rss_mb": rss_mb("VmHWM"), "rss_before_mb": before}))
"""

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _random_llama3_adapters(root: Path, rank: int = 16) -> None:
    """Two stock-format r = 16 LoRA adapter folders with Llama-3-8B shapes (random factors)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    for k, name in enumerate(("a", "b")):
        folder = root / name
        if (folder / "adapter_model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(k)
        tensors = {}
        for i in range(32):
            for mod, (m, n) in LLAMA3_8B.items():
                key = f"base_model.model.model.layers.{i}.{_PARENT[mod]}.{mod}"
                tensors[f"{key}.lora_A.weight"] = 0.01 * torch.randn(rank, n, generator=gen)
                tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(m, rank, generator=gen)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        LoraConfig(r=rank, lora_alpha=32, target_modules=list(LLAMA3_8B),
                   base_model_name_or_path="meta-llama/Meta-Llama-3-8B").save_pretrained(folder)


def scale(out: Path, peft_layers: int) -> dict:
    src = out / "work" / "scale"
    _random_llama3_adapters(src)
    results = []
    for method, layers in (("fixed_rank", 32), ("peft_svd", peft_layers)):
        print(f"[merge bench] scale: {method} on {layers} layers", flush=True)
        run = subprocess.run([sys.executable, "-c", SCALE_CHILD, method, str(layers),
                              json.dumps(LLAMA3_8B), str(src)], cwd=REPO, env=_env(),
                             check=True, capture_output=True, text=True)
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    fr, ps = results
    per_layer = ps["seconds"] / ps["layers"]
    summary = {
        "shapes": LLAMA3_8B, "rank": 16, "threads": 1, "results": results,
        "fixed_rank_seconds_224": fr["seconds"],
        "peft_svd_seconds_per_layer": per_layer,
        "peft_svd_seconds_224_extrapolated": per_layer * 32,
        "speedup_extrapolated": per_layer * 32 / fr["seconds"],
        "fixed_rank_merge_peak_mb": fr["peak_rss_mb"] - fr["rss_before_mb"],
        "peft_svd_merge_peak_mb": ps["peak_rss_mb"] - ps["rss_before_mb"],
        "note": f"fixed_rank: merge_adapters on the two adapter folders (reading, merging and "
                f"writing all 224 modules). PEFT svd: add_weighted_adapter measured on "
                f"{peft_layers} of 32 decoder layers (7 modules each) and extrapolated linearly "
                f"(its base model, bf16, 256-token vocabulary, is not used by the svd type). "
                f"Peak = peak RSS during the merge minus the RSS before it; one thread.",
    }
    from riemann_zero import io

    io.write_json(out / "scale.json", summary)
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--limit", type=int, default=100, help="documents per task (>= 100)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--scale", action="store_true", help="the Llama-3-8B-shape scale figures")
    p.add_argument("--peft-layers", type=int, default=1,
                   help="decoder layers on which PEFT's svd type is timed (scale)")
    p.add_argument("--only", default=None, help="comma-separated model names to evaluate")
    p.add_argument("--no-eval", action="store_true", help="train and merge only")
    p.add_argument("--no-train", action="store_true", help="use the singles already trained")
    p.add_argument("--force", action="store_true",
                   help="let the report replace OUT/merge.json even where it holds results this "
                        "report lacks (without it such a report is refused and writes nothing)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.scale:
        scale(out, args.peft_layers)
        return 0
    singles = {f"{f} {t}": out / "runs" / f"{f}_{t}" / "adapter" for f in ("lora", "oft")
               for t in TASKS}
    merged = {name: out / "work" / "merged" / _slug(name) for name in MERGES}
    if not args.report_only:
        singles = train(out, skip=args.no_train)
        merged = merge_all(out, singles)
        models = {**singles, **merged}
        if args.no_eval:
            return 0
        if args.only:
            keep = set(args.only.split(","))
            models = {k: v for k, v in models.items() if k in keep}
        evaluate(out, models, args.limit)
    try:
        report(out, {**singles, **merged}, args.limit, force=args.force)
    except WouldLoseResults as err:
        print(f"bench/merge.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
