"""The training loop behind ``riemann_zero.train``: engines, steps, metrics, eval, checkpoints.

Two engines expose the same four calls (forward, ``backward``, ``step`` at each micro-batch,
``save``/``load``): DeepSpeed (any ZeRO stage, from the recipe's ``deepspeed:`` block) and FSDP2
(``fully_shard`` on every decoder layer, then on the whole model; started by torchrun).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from riemann_zero import checkpoint as ckpt
from riemann_zero.preflight import Plan
from riemann_zero.recipe import MANIFOLD_OPTIMIZERS, Recipe

__all__ = ["run_training", "DeepSpeedEngine", "FSDP2Engine"]


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[riemann_zero] {msg}", flush=True)


class DeepSpeedEngine:
    """``deepspeed.initialize`` with the client optimizer and a LambdaLR on its param groups."""

    def __init__(self, model, optimizer, lr_fn, ds_config: dict[str, Any]) -> None:
        import deepspeed

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.client_optimizer = optimizer
        self.module = self.engine.module
        self.device = self.engine.device
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    def __call__(self, **batch):
        return self.engine(**batch)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # steps optimizer and scheduler at accumulation boundaries only

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def lr(self) -> float:
        return float(self.client_optimizer.param_groups[0]["lr"])

    def io(self, exclude_frozen: bool):
        return ckpt.deepspeed_io(self.engine, exclude_frozen=exclude_frozen)

    def gathered(self, params):
        """Context that makes ZeRO-3-partitioned parameters whole (identity below stage 3)."""
        import contextlib

        import deepspeed

        if self.stage < 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class FSDP2Engine:
    """FSDP2 (``fully_shard``) with manual gradient accumulation and clipping."""

    def __init__(self, model, make_optimizer, lr_fn, grad_accum: int, clip: float,
                 device: torch.device) -> None:
        from torch.distributed.fsdp import fully_shard

        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        self.module = model
        self.optimizer = make_optimizer(model)
        self.client_optimizer = self.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn)
        self.grad_accum, self.clip, self.device = grad_accum, clip, device
        self.micro = 0

    def __call__(self, **batch):
        last = (self.micro + 1) % self.grad_accum == 0
        self.module.set_requires_gradient_sync(last)
        return self.module(**batch)

    def backward(self, loss) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.grad_accum:
            return
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.grad is not None], self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def io(self, exclude_frozen: bool):
        import torch.distributed.checkpoint as dcp

        # Manifold optimizers stay out of torch.distributed.checkpoint's optimizer path: it keeps
        # only torch.optim's state/param_groups (dropping the per-adapter momentum and masters)
        # and, finding torch.optim's state empty, runs a dummy zero-lr step() to initialise it,
        # which would decay the momentum. Their own state_dict() (this rank's rows) is saved per
        # rank instead; the model goes through DCP.
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        manifold = hasattr(self.optimizer, "adapter_state_dict")
        per_rank = f"optimizer_rank{dist.get_rank()}.pt"

        def write(directory: Path) -> None:
            if manifold:
                dcp.save({"model": get_model_state_dict(self.module)},
                         checkpoint_id=str(directory))
                torch.save(self.optimizer.state_dict(), directory / per_rank)
            else:
                msd, osd = get_state_dict(self.module, self.optimizer)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))
            if dist.get_rank() == 0:
                torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

        def read(directory: Path) -> None:
            if manifold:
                state = {"model": get_model_state_dict(self.module)}
                dcp.load(state, checkpoint_id=str(directory))
                set_model_state_dict(self.module, state["model"])
                self.optimizer.load_state_dict(
                    torch.load(directory / per_rank, weights_only=False))
            else:
                msd, osd = get_state_dict(self.module, self.optimizer)
                state = {"model": msd, "optim": osd}
                dcp.load(state, checkpoint_id=str(directory))
                set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optim"])
            self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt"))

        return write, read

    def gathered(self, params):
        import contextlib

        return contextlib.nullcontext()


def _collate(items: list[dict], idx: list[int], collator, device) -> dict:
    batch = collator([items[i] for i in idx])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["use_cache"] = False  # packed rows rely on it; training never needs the KV cache
    return batch


def _count_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else 0


@torch.no_grad()
def _eval_loss(eng, items, collator, recipe: Recipe, rank: int, world: int) -> float | None:
    """Token-weighted mean loss over the eval set (every rank takes an equal share)."""
    if not items:
        return None
    eng.train(False)
    mb = recipe.train.micro_batch_size
    per_rank = len(items) // world
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), mb):
        batch = _collate(items, mine[i:i + mb], collator, eng.device)
        n = _count_tokens(batch)
        loss = eng(**batch).loss.float().item()
        total += torch.tensor([loss * n, n], dtype=torch.float64)
    dist.all_reduce(total)
    eng.train(True)
    return float(total[0] / total[1]) if total[1] > 0 else None


def _health(optimizer) -> dict[str, float]:
    """Manifold health from the optimizer's own (possibly sharded) factors; collective."""
    import riemann_zero as rz

    return {f"manifold/{k}": float(v) for k, v in rz.manifold_health(optimizer).items()}


def run_training(recipe: Recipe, plan: Plan, *, rank: int, world: int, on_cpu: bool,
                 run_info: dict[str, Any]) -> dict[str, Any]:
    """Train as the recipe says; returns a summary for run.json (or ``{"stopped": True}``)."""
    import deepspeed
    from tqdm import tqdm
    from transformers import AutoTokenizer, set_seed

    from riemann_zero import data as rzdata
    from riemann_zero.train import (
        batch_order,
        build_model,
        build_optimizer,
        deepspeed_config,
        lr_lambda,
        write_json,
    )

    t0 = time.perf_counter()
    backend = "gloo" if on_cpu else "nccl"
    device = torch.device("cpu")
    if not on_cpu:  # one GPU per local rank; LOI's backward passes already run there
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if recipe.engine == "deepspeed":
        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)
    out = Path(recipe.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", run_info)
    dist.barrier()

    # Data: tokenized once, ordered deterministically (see batch_order).
    tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dc = recipe.data
    if dc.eval_split == "holdout":  # the first eval_limit shuffled examples never train
        limit = None if dc.train_limit is None else dc.train_limit + dc.eval_limit
        pool = rzdata.load_examples(dc.train, split="train", limit=limit, seed=recipe.seed)
        eval_ex, train_ex = pool[:dc.eval_limit], pool[dc.eval_limit:]
    else:
        train_ex = rzdata.load_examples(dc.train, split="train", limit=dc.train_limit,
                                        seed=recipe.seed)
        eval_ex = rzdata.load_examples(dc.eval or dc.train, split="eval", limit=dc.eval_limit,
                                       seed=recipe.seed) if dc.eval_limit else []
    tok_kw = {"template": dc.template, "max_length": dc.max_length}
    train_items = rzdata.tokenize(train_ex, tokenizer, packing=dc.packing, **tok_kw)
    eval_items = rzdata.tokenize(eval_ex, tokenizer, **tok_kw) if eval_ex else []
    collator = rzdata.Collator(tokenizer)
    mb, gas = recipe.train.micro_batch_size, plan.grad_accum
    micro_per_epoch = len(batch_order(len(train_items), seed=recipe.seed, epoch=0, rank=rank,
                                      world=world, micro=mb))
    steps_per_epoch = micro_per_epoch // gas
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_items)} training examples make no full optimizer step of "
                         f"{plan.global_batch} examples; lower the batch or add data")
    total = recipe.max_steps or max(1, int(recipe.train.epochs * steps_per_epoch))
    _log(rank, f"data ready ({time.perf_counter() - t0:.0f} s): "
               f"{len(train_items)} train / {len(eval_items)} eval examples; global batch "
               f"{plan.global_batch} = {mb} x {gas} x {world}; {total} steps "
               f"({total / steps_per_epoch:.2f} epochs)")

    # Model. The calibration batches of LOI (and LoRA-GA) are shared out over the ranks and their
    # sketches (gradients) summed, so every rank builds the same model and none does all passes.
    per_rank = -(-recipe.init.batches // world)
    first = batch_order(len(train_items), seed=recipe.seed, epoch=0, rank=0, world=1, micro=mb)
    mine = first[: per_rank * world][rank::world]
    calibration = [_collate(train_items, idx, collator, device) for idx in mine]
    set_seed(recipe.seed)  # the same initial adapter on every rank
    model = build_model(recipe, plan, calibration, device,
                        reduce=(lambda t: dist.all_reduce(t)) if world > 1 else None, world=world)
    set_seed(recipe.seed + 1 + rank)  # then independent dropout masks per rank
    manifold = recipe.optimizer.name in MANIFOLD_OPTIMIZERS
    _log(rank, f"model ready ({time.perf_counter() - t0:.0f} s): {recipe.init.method} init")
    lr_fn = lr_lambda(recipe, total)
    if recipe.engine == "deepspeed":
        eng = DeepSpeedEngine(model, build_optimizer(recipe, model), lr_fn,
                              deepspeed_config(recipe, plan, world))
    else:
        eng = FSDP2Engine(model, lambda m: build_optimizer(recipe, m), lr_fn, gas,
                          recipe.train.gradient_clipping, device)

    _log(rank, f"{recipe.engine} engine ready ({time.perf_counter() - t0:.0f} s)")
    # Resume: the engine's state, then this rank's loop state and RNG streams.
    write_state, read_state = eng.io(exclude_frozen=True)
    start = 0
    if plan.resume_from is not None:
        read_state(plan.resume_from)
        state = ckpt.load_trainer_state(plan.resume_from, rank)
        ckpt.set_rng_state(state["rng"])
        start = int(state["step"])
        _log(rank, f"resumed from {plan.resume_from} at step {start}")
    metrics_path = out / "metrics.jsonl"
    if rank == 0:  # drop lines written after the checkpoint we resumed from
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= start]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))

    def emit(record: dict[str, Any]) -> None:
        if rank == 0:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    orders: dict[int, list] = {}

    def next_micro(k: int) -> dict:
        """The k-th micro-batch of this rank since the start of training."""
        epoch, j = divmod(k, micro_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batch_order(len(train_items), seed=recipe.seed, epoch=epoch,
                                        rank=rank, world=world, micro=mb)
        return _collate(train_items, orders[epoch][j], collator, eng.device)

    if recipe.train.eval_every and start == 0:
        emit({"step": 0, "eval_loss": _eval_loss(eng, eval_items, collator, recipe, rank, world)})
    eng.train(True)
    bar = tqdm(total=total, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    first_loss = last_loss = None
    tokens_seen = 0
    for step in range(start + 1, total + 1):
        t0 = time.perf_counter()
        lr = eng.lr()
        loss_sum, tokens, optim_time = 0.0, 0, 0.0
        for a in range(gas):
            batch = next_micro((step - 1) * gas + a)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else \
                batch["input_ids"].numel()
            loss = eng(**batch).loss
            eng.backward(loss)
            loss_sum += float(loss.detach().float())
            t_opt = time.perf_counter()
            eng.step()
            if a == gas - 1:
                optim_time = time.perf_counter() - t_opt
        reduced = torch.tensor([loss_sum / gas, tokens], dtype=torch.float64)
        dist.all_reduce(reduced)
        step_time = time.perf_counter() - t0
        loss_val, tokens_all = float(reduced[0] / world), int(reduced[1])
        tokens_seen += tokens_all
        first_loss = loss_val if first_loss is None else first_loss
        last_loss = loss_val
        record = {"step": step, "loss": loss_val, "lr": lr, "tokens": tokens_all,
                  "tokens_per_s": tokens_all / step_time, "step_time_s": step_time,
                  "optim_time_s": optim_time, "epoch": (step * gas) / micro_per_epoch}
        if manifold:
            record.update(_health(eng.client_optimizer))
        if step % recipe.train.log_every == 0 or step == total:
            emit(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
        if recipe.train.eval_every and step % recipe.train.eval_every == 0 and step != total:
            emit({"step": step, "eval_loss": _eval_loss(eng, eval_items, collator, recipe, rank,
                                                        world)})
        if recipe.train.save_every and step % recipe.train.save_every == 0:
            ckpt.save_checkpoint(out / "checkpoints", step, write_engine_state=write_state,
                                 trainer_state={"step": step, "micro_batches": step * gas},
                                 rank=rank, barrier=dist.barrier,
                                 keep_last=recipe.train.keep_last)
        if recipe.stop_after is not None and step == recipe.stop_after:
            bar.close()
            _log(rank, f"stopping after step {step} (stop_after)")
            return {"stopped": True}
    bar.close()
    eval_loss = _eval_loss(eng, eval_items, collator, recipe, rank, world)
    emit({"step": total, "eval_loss": eval_loss})
    _save_adapter(eng, out / "adapter", manifold=manifold, rank=rank)
    dist.barrier()
    return {"steps": total, "first_loss": first_loss, "final_loss": last_loss,
            "final_eval_loss": eval_loss, "tokens": tokens_seen,
            "adapter": str(out / "adapter")}


def _save_adapter(eng, out_dir: Path, *, manifold: bool, rank: int) -> None:
    """A stock PEFT adapter relative to the original base (after LOI, PiSSA or LoRA-GA too)."""
    module = eng.module
    if manifold:
        import riemann_zero as rz

        rz.save_adapter(module, out_dir)  # collective under ZeRO-3/FSDP2; rank 0 writes
        return
    state = None
    if isinstance(eng, FSDP2Engine):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
    lora = [p for n, p in module.named_parameters() if "lora_" in n]
    with eng.gathered(lora):
        if rank == 0:
            _write_peft_adapter(module, out_dir, state)


def _write_peft_adapter(module, out_dir: Path, state: dict | None) -> None:
    """``save_pretrained``, converted when the init moved the base, written atomically."""
    from riemann_zero.checkpoint import write_dir_atomically
    from riemann_zero.peft_inits import INITIAL_ATTR, save_relative_to_original

    def build(tmp: Path) -> None:
        module.save_pretrained(str(tmp), state_dict=state)
        initial = getattr(module, INITIAL_ATTR, None)
        if initial is not None:  # PiSSA / LoRA-GA moved the base weight
            save_relative_to_original(tmp, initial)

    write_dir_atomically(out_dir, build)
