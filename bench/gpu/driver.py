"""GPU kit, part 2: the training driver on one accelerator, and its adapter in stock PEFT.

No weights travel to the device: a small Llama is built from a config with random weights,
together with a byte-level BPE tokenizer trained in a second on the kit's own synthetic data
(Alpaca records "Count up from a in steps of k." → "a a+k a+2k ..."), and saved in a work folder.
Then, for each engine:

1. ``bash launch/run.sh RECIPE`` (DeepSpeed's launcher, one process per GPU; torchrun for FSDP2):
   Riemannion + LOI, ``max_steps`` steps, eval loss at step 0 and at the end. On the GPU: ZeRO-2
   over NCCL in bf16; in the dry run: one CPU process over gloo in fp32.
2. The exported adapter, loaded by stock PEFT on the original base in a process that never
   imports riemann_zero, reproduces the driver's final eval loss, and the base alone does not.

Tolerance of (2): the driver (padded batches, LOI-shifted base plus the rank-2r manifold layout)
and stock PEFT (one row at a time, original base plus the exported rank-r adapter) round
differently. In fp32 that moves the loss by ~1e-6 relative: accepted up to 1e-4 relative, as in
tests/train/test_e2e.py. In bf16 the size of the rounding effect is measured on the same model:
the stock loss in bf16 against the stock loss in fp32; the driver may differ from stock-bf16 by 4
times that (two different bf16 evaluations, each that far from the exact value, plus margin).
The check also requires the adapter to matter: the base alone (the model before training, since
LOI starts from ΔW = 0 relative to the original base) must score worse than the driver's final
loss, and farther from it than 10 times the tolerance.

    python bench/gpu/driver.py --out OUT/driver.json [--dry-run] [--engines zero2 fsdp2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STEPS = 10
ENGINES = {"zero2": [], "fsdp2": ["engine=fsdp2"]}
MODEL = {  # the GPU run's model; the dry run divides the widths by 8 and keeps 2 layers
    "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256,
}
REL_FP32 = 1e-4
BF16_FACTOR = 4.0
EFFECT_FACTOR = 10.0


def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, k = rng.randrange(0, 60), rng.randrange(1, 6)
        out.append({"instruction": f"Count up from {a} in steps of {k}.", "input": "",
                    "output": " ".join(str(a + i * k) for i in range(6))})
    return out


def build_assets(work: Path, dry_run: bool) -> dict:
    """Model folder (random Llama + tokenizer), train and eval JSONL files under ``work``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from riemann_zero.data.prompts import render_prompt

    train, evals = _records(512, 0), _records(32, 1)
    for name, recs in (("train.jsonl", train), ("eval.jsonl", evals)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    texts = [render_prompt(r["instruction"], "alpaca") + r["output"] for r in train]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    shape = dict(MODEL)
    if dry_run:
        shape.update(hidden_size=64, intermediate_size=176, num_hidden_layers=2)
    config = LlamaConfig(vocab_size=len(fast), bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    model_dir = work / "model"
    LlamaForCausalLM(config).float().save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return {"model": str(model_dir), "train": str(work / "train.jsonl"),
            "eval": str(work / "eval.jsonl"), "eval_records": evals, "config": shape,
            "vocab": len(fast)}


def recipe(assets: dict, out: Path, bf16: bool) -> dict:
    return {
        "output_dir": str(out), "max_steps": STEPS, "seed": 0,
        "model": {"name_or_path": assets["model"]},
        "lora": {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"]},
        "init": {"method": "loi", "p": 8, "q": 1, "batches": 1},
        "data": {"train": assets["train"], "eval": assets["eval"],
                 "eval_limit": len(assets["eval_records"]), "template": "alpaca",
                 "max_length": 64},
        "optimizer": {"name": "riemannion", "lr": 2e-2, "momentum": 0.9, "weight_decay": 0.0},
        "schedule": {"type": "constant", "warmup_steps": 0},
        "train": {"micro_batch_size": 16, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 1.0, "eval_every": 0, "save_every": 0},
        "eval_after": None,
        "logging": {"tensorboard": False},
        "deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": bf16}},
    }


def eval_rows(assets: dict) -> list[dict]:
    """The eval set as the driver tokenizes it (prompt with BOS, answer + eos, loss on the
    answer); rows are short, so nothing is truncated."""
    from transformers import AutoTokenizer

    from riemann_zero.data.prompts import render_prompt

    tok = AutoTokenizer.from_pretrained(assets["model"])
    rows = []
    for rec in assets["eval_records"]:
        p = tok(render_prompt(rec["instruction"], "alpaca"))["input_ids"]
        a = tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p) + len(a) > 64:
            raise RuntimeError("an eval row is longer than data.max_length; shorten the records")
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return rows


# Runs in a fresh process that never imports riemann_zero: stock transformers + PEFT only.
STOCK = textwrap.dedent("""
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, adapter, rows_file, device, *dtypes = sys.argv[1:]
    rows = json.load(open(rows_file))
    out = {}
    for dtype in dtypes:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).to(device)
        model = PeftModel.from_pretrained(model, adapter).eval()
        def loss():
            num = den = 0.0
            with torch.no_grad():
                for r in rows:
                    ids = torch.tensor([r["input_ids"]], device=device)
                    labels = torch.tensor([r["labels"]], device=device)
                    n = int((labels[:, 1:] != -100).sum())
                    num += model(input_ids=ids, labels=labels).loss.float().item() * n
                    den += n
            return num / den
        out["stock_" + dtype] = loss()
        with model.disable_adapter():
            out["base_" + dtype] = loss()
    assert "riemann_zero" not in sys.modules
    print(json.dumps(out))
""")


def _env(dry_run: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO),
                                                      env.get("PYTHONPATH", "")]))
    env["PYTHON"] = sys.executable  # launch/run.sh starts its launcher with this interpreter
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if dry_run:
        env.update(NPROC="1", OMP_NUM_THREADS="1")
    return env


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on timeout the launcher's rank processes are
    killed with it (they would otherwise keep the GPU memory the next part needs)."""
    proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_engine(engine: str, assets: dict, work: Path, dry_run: bool, timeout: float) -> dict:
    import yaml

    bf16 = not dry_run
    out = work / f"run_{engine}"
    spec = work / f"{engine}.yaml"
    spec.write_text(yaml.safe_dump(recipe(assets, out, bf16)))
    cmd = ["bash", str(common.REPO / "launch" / "run.sh"), str(spec), *ENGINES[engine]]
    start = time.perf_counter()
    proc = _run(cmd, _env(dry_run), timeout)
    result = {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
              "seconds": time.perf_counter() - start, "dtype": "bfloat16" if bf16 else "float32",
              "backend": "gloo (CPU)" if dry_run else "nccl"}
    print(proc.stdout[-2000:] + proc.stderr[-3000:], flush=True)
    if proc.returncode != 0:
        result.update(ok=False, error=f"the driver exited with {proc.returncode}",
                      log_tail=(proc.stdout + proc.stderr)[-4000:])
        return result
    run = json.loads((out / "run.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    result.update(status=run.get("status"), world_size=run.get("world_size"),
                  train_losses=losses, eval_losses=evals, final_eval_loss=run["final_eval_loss"],
                  step_s=[m.get("step_time") for m in metrics if "loss" in m])
    rows_file = work / "eval_rows.json"
    rows_file.write_text(json.dumps(eval_rows(assets)))
    device = "cpu" if dry_run else "cuda"
    dtypes = ["float32", "bfloat16"] if bf16 else ["float32"]
    stock = _run([sys.executable, "-c", STOCK, assets["model"], str(out / "adapter"),
                  str(rows_file), device, *dtypes], _env(dry_run), timeout)
    if stock.returncode != 0:
        result.update(ok=False, error="stock PEFT could not load or evaluate the adapter",
                      log_tail=stock.stderr[-4000:])
        return result
    losses = json.loads(stock.stdout.strip().splitlines()[-1])
    result.update(losses)
    driver = result["final_eval_loss"]
    key = "bfloat16" if bf16 else "float32"
    rounding = abs(losses["stock_bfloat16"] - losses["stock_float32"]) if bf16 else 0.0
    tol = max(REL_FP32 * abs(driver), BF16_FACTOR * rounding)
    gap, effect = abs(losses["stock_" + key] - driver), abs(losses["base_" + key] - driver)
    result.update(stock_gap=gap, adapter_effect=effect, tol=tol,
                  ok=bool(run.get("status") == "finished" and gap <= tol
                          and effect > EFFECT_FACTOR * tol and driver < losses["base_" + key]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="one CPU process, gloo, fp32")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds for the whole part; an engine starts only with 40%% left")
    args = ap.parse_args()
    start = time.perf_counter()
    result: dict = {"dry_run": args.dry_run, "steps": STEPS, "engines": {}}
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            result.update(ok=False, error="CUDA is not available (without a GPU use --dry-run)")
            args.out.write_text(json.dumps(result, indent=1))
            raise SystemExit(result["error"])
    with tempfile.TemporaryDirectory(prefix="gpu-kit-driver-") as tmp:
        work = Path(tmp)
        assets = build_assets(work, args.dry_run)
        result["model"] = {"config": assets["config"], "vocab": assets["vocab"]}
        result["recipe"] = recipe(assets, Path("OUTPUT_DIR"), not args.dry_run)
        for engine in args.engines:
            left = args.budget - (time.perf_counter() - start)
            if engine != args.engines[0] and left < 0.4 * args.budget:
                result["engines"][engine] = {"ok": None, "skipped": f"{left:.0f} s left"}
                continue
            try:
                result["engines"][engine] = run_engine(engine, assets, work, args.dry_run,
                                                       max(left, 30.0))
            except Exception as err:  # one engine failing leaves the other's result
                result["engines"][engine] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                             "traceback": traceback.format_exc()[-3000:]}
            print(f"[driver] {engine}: {result['engines'][engine].get('ok')}", flush=True)
            args.out.write_text(json.dumps(result, indent=1))
    ran = [e for e in result["engines"].values() if e.get("ok") is not None]
    result["ok"] = bool(ran) and all(e["ok"] for e in ran)
    result["seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(result, indent=1))
    if not result["ok"]:
        raise SystemExit("driver: a run failed (see the JSON)")


if __name__ == "__main__":
    main()
