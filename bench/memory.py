"""Peak resident memory per rank with partitioned loading against whole-model-per-rank loading.

A random-initialised Llama-architecture model in fp32 (SmolLM2's tokenizer and 49k vocabulary,
tied embeddings; ``--size``) is written once as safetensors to a cache folder outside git. The
real driver then trains it for 2 steps (LoRA r=8 on q,v, 1 sequence of 32 tokens per rank,
Riemannion, zero init) under ZeRO-3 and FSDP2 at worlds 1, 2 and 3, with
``model.partitioned_load`` true (each rank creates and reads only its part) and false (every rank
loads the whole model first, the behaviour before partitioned loading). The driver logs every
rank's peak RSS (``VmHWM``): after loading (the "engine ready" line, run.json
``peak_rss_mib_loaded``) and after the 2 steps (metrics.jsonl). Next to it: base/world (the
weights a rank must hold) and the peak of a process that only imports the libraries.

    python bench/memory.py                      # 0.23 B (880 MiB fp32), 12 runs, ~12 min on 2 cores
    python bench/memory.py --size 1b --worlds 1 2 3   # needs ~24 GB free for the whole-model runs

Writes ``bench/results/memory.json`` and ``memory.png`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("RIEMANN_ZERO_CACHE", Path.home() / ".cache" / "riemann_zero"))
# Llama shapes: hidden, MLP, layers, heads, KV heads (head dim 64 or 128), vocab SmolLM2's 49152.
SIZES = {
    "0.25b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=4),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                 num_attention_heads=12, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
               num_attention_heads=16, num_key_value_heads=4),
}
RUN = ["max_steps=2", "data.train=commonsense:ARC-Easy", "data.train_limit=32",
       "data.eval_limit=0", "data.max_length=32", "lora.target_modules=q_proj,v_proj",
       "lora.r=8", "train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
       "train.save_every=0", "eval_after.suite=null", "init.method=zero",
       "logging.tensorboard=false"]
# DeepSpeed's defaults keep up to 1e9 gathered parameters alive between forward and backward
# (stage3_max_live_parameters, stage3_max_reuse_distance) and prefetch 5e7: more than this whole
# model, so every rank would hold it all again from the first step. A bound below one layer makes
# ZeRO-3 release each layer after use, as it must at a scale where memory is the point.
ZERO3_LIVE = ["deepspeed.zero_optimization.stage3_max_live_parameters=1000000",
              "deepspeed.zero_optimization.stage3_max_reuse_distance=1000000",
              "deepspeed.zero_optimization.stage3_prefetch_bucket_size=1000000"]
# glibc's malloc serves blocks up to 32 MiB (its dynamic mmap threshold) from a heap that keeps
# them resident after they are freed, so a peak RSS would count every layer ZeRO-3 ever gathered
# and released. With a fixed 1 MiB threshold each larger tensor is its own mapping, returned on
# free, and the peak counts what was alive at once (measured at world 2, ZeRO-3, partitioned:
# 1502 MiB after 2 steps, against 1965-2644 with glibc's default).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
ENGINES = {"zero3": ["engine=deepspeed", "deepspeed.zero_optimization.stage=3", *ZERO3_LIVE],
           "fsdp2": ["engine=fsdp2"]}


def model_folder(size: str) -> Path:
    """The random fp32 model of ``size`` with SmolLM2's tokenizer, written once (cached)."""
    folder = CACHE / "bench" / f"random_llama_{size}"
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json"
                                                    ).is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from riemann_zero import assets

    tok = AutoTokenizer.from_pretrained(assets.smollm2(layers=4))
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            names = fh.keys()
            for key in names:
                shape = fh.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def import_floor() -> float:
    """Peak RSS (MiB) of a process that imports what a rank imports, and nothing else."""
    code = ("import torch, deepspeed, transformers, peft, riemann_zero.train.loop\n"
            "from riemann_zero.io import peak_rss_mib\nprint(peak_rss_mib())")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(folder: Path, engine: str, partitioned: bool, world: int, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **MALLOC)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(port), "-m", "riemann_zero.train",
           str(REPO / "recipes" / "smollm2_commonsense.yaml"), f"model.name_or_path={folder}",
           *RUN, *ENGINES[engine], f"model.partitioned_load={str(partitioned).lower()}",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{engine} world {world} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    info = json.loads((out / "run.json").read_text())
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in steps if "peak_rss_mib" in r][-1]["peak_rss_mib"]
    return {"engine": engine, "partitioned": partitioned, "world": world, "load": info["load"],
            "loaded_mib": info["peak_rss_mib_loaded"], "trained_mib": trained,
            "losses": [r["loss"] for r in steps if "loss" in r]}


ENGINE_NAMES = {"zero3": "ZeRO-3", "fsdp2": "FSDP2"}


def table(rows: list[dict], base_mib: float, floor: float) -> str:
    """The Markdown table BENCHMARKS.md quotes ("Memory at scale")."""
    lines = ["| engine | world | loading | peak RSS after loading, MiB (max over ranks) | "
             "after 2 steps | base/world | base/world + import floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        load = "partitioned" if r["partitioned"] else "whole per rank"
        share = base_mib / r["world"]
        lines.append(f"| {ENGINE_NAMES[r['engine']]} | {r['world']} | {load} | "
                     f"{max(r['loaded_mib']):.0f} | {max(r['trained_mib']):.0f} | {share:.0f} | "
                     f"{share + floor:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], base_mib: float, floor: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, engine in zip(axes, ENGINES):
        for partitioned, style in ((False, "s--"), (True, "o-")):
            sel = [r for r in rows if r["engine"] == engine and r["partitioned"] == partitioned]
            if not sel:
                continue
            worlds = [r["world"] for r in sel]
            label = "partitioned" if partitioned else "whole per rank"
            ax.plot(worlds, [max(r["trained_mib"]) for r in sel], style, label=label)
        worlds = sorted({r["world"] for r in rows})
        ax.plot(worlds, [base_mib / w + floor for w in worlds], ":", color="gray",
                label="base/world + import floor")
        ax.axhline(floor, color="lightgray", lw=1)
        ax.set_title(f"{engine}: peak RSS per rank after 2 steps")
        ax.set_xlabel("world size (ranks)")
        ax.set_xticks(worlds)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("MiB (max over ranks)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="0.25b")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--engines", nargs="+", choices=sorted(ENGINES), default=list(ENGINES))
    ap.add_argument("--work", type=Path, default=CACHE / "bench" / "memory_runs")
    args = ap.parse_args()
    folder = model_folder(args.size)
    n = parameters(folder)
    base_mib = 4 * n / 2**20
    floor = import_floor()
    print(f"model {folder}: {n / 1e9:.3f} B parameters, {base_mib:.0f} MiB fp32; "
          f"import floor {floor:.0f} MiB", flush=True)
    rows = []
    for engine in args.engines:
        for partitioned in (True, False):
            for world in args.worlds:
                out = args.work / f"{engine}_{'part' if partitioned else 'whole'}_w{world}"
                res = run(folder, engine, partitioned, world, out)
                print(json.dumps(res), flush=True)
                rows.append(res)
    RESULTS.mkdir(exist_ok=True)
    record = {"size": args.size, "parameters": n, "base_mib": base_mib, "import_floor_mib": floor,
              "runs": rows}
    (RESULTS / "memory.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(rows, base_mib, floor, RESULTS / "memory.png",
         f"random Llama {n / 1e9:.2f} B fp32 ({base_mib:.0f} MiB), LoRA r=8 q,v, CPU/gloo")
    print(table(rows, base_mib, floor))


if __name__ == "__main__":
    main()
