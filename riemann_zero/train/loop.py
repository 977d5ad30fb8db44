"""The training loop behind ``python -m riemann_zero.train``: data, model, engine, steps, metrics,
eval loss, checkpoints, the exported adapter.

Every logged step writes one line to ``metrics.jsonl`` (rank 0): loss, lr, tokens, tokens/s, step
and optimizer time, epoch; for optimizers whose registry row says so, the manifold health
(``manifold/orth_err_U`` …, a collective, so computed on logged steps only); and for the manifold
optimizers their own communication of that step, bytes by collective (``comm/all_reduce.gram_m``
…, the keys of ``last_step_comm``), and every rank's peak resident memory so far
(``peak_rss_mib``, one value per rank, also in run.json and in the "engine ready" line).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from riemann_zero.adapters.export import save_adapter, save_peft_adapter
from riemann_zero.data.examples import has_eval_split, load_examples
from riemann_zero.data.tokens import Collator, tokenize
from riemann_zero.io import peak_rss_mib, write_json, write_text_atomically
from riemann_zero.optim import registry
from riemann_zero.optim.base import manifold_health
from riemann_zero.progress import say, stage
from riemann_zero.sharding.params import full_tensor, gathered, local_values
from riemann_zero.train import checkpoint as ckpt
from riemann_zero.train.build import (
    batch_order,
    build_model,
    build_optimizer,
    lr_lambda,
)
from riemann_zero.train.engines import DeepSpeedEngine, FSDP2Engine
from riemann_zero.train.preflight import Plan
from riemann_zero.train.recipe import Recipe, RecipeError
from riemann_zero.train.tracking import Trackers

__all__ = ["run_training", "Diverged"]


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient norm or parameter; nothing of that step was
    saved. The message is one line: the step, what was non-finite, the lr and what to try."""


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


def _peak_rss(rank: int, world: int) -> list[float]:
    """Every rank's peak resident memory so far, MiB (collective; 0 where not measurable)."""
    rss = torch.zeros(world, dtype=torch.float64)
    rss[rank] = peak_rss_mib() or 0.0
    dist.all_reduce(rss)
    return [round(float(v), 1) for v in rss]


def _trainable(module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _nonfinite(params: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of trainable parameters holding a NaN or an infinity in this rank's part (one pass
    over the adapters; no communication)."""
    if not params:
        return []
    # One flag per tensor on its device, then a single host transfer: no sync per tensor.
    flags = [torch.isfinite(local_values(p).detach()).all() for _, p in params]
    flags = torch.stack([f.to(flags[0].device) for f in flags]).cpu().tolist()
    return [name for (name, _), ok in zip(params, flags) if not ok]


def _state_bytes(params: list[tuple[str, torch.Tensor]]) -> int:
    """Rough size of a first checkpoint: each trainable value with its fp32 master and two
    optimizer moments (later checkpoints use the size of the previous one)."""
    return sum(4 * 4 * int(getattr(p, "ds_numel", p.numel())) for _, p in params)


def _skip_allowance(recipe: Recipe) -> int:
    """Steps with a non-finite loss the run tolerates when the engine skipped their update
    (``train.skip_nonfinite_steps``; unset: 0 in fp32, 3 with bf16/fp16)."""
    if recipe.train.skip_nonfinite_steps is not None:
        return recipe.train.skip_nonfinite_steps
    ds = recipe.deepspeed
    low = any(bool((ds.get(k) or {}).get("enabled", False)) for k in ("bf16", "fp16"))
    return 3 if low else 0


def _divergence(step: int, lr: float, what: str, newest: Path | None) -> Diverged:
    kept = f"the newest checkpoint, {newest}, is finite" if newest else "no checkpoint was written"
    return Diverged(f"training diverged at step {step}: non-finite {what} at lr {lr:.3g}; nothing "
                    f"of this step was saved and {kept}. Try a lower optimizer.lr (e.g. "
                    f"{lr / 10:.1g}), more schedule.warmup_steps or train.gradient_clipping, in a "
                    f"new output_dir")


def _health(optimizer) -> dict[str, float]:
    """Manifold health from the optimizer's own (possibly sharded) factors; collective."""
    return {f"manifold/{k}": float(v) for k, v in manifold_health(optimizer).items()}


def _comm(optimizer) -> dict[str, int]:
    """The optimizer's own bytes of the last step, by collective (empty on one process)."""
    return {f"comm/{k}": int(v) for k, v in getattr(optimizer, "last_step_comm", {}).items()}


def run_training(recipe: Recipe, plan: Plan, *, rank: int, world: int, on_cpu: bool,
                 run_info: dict[str, Any]) -> dict[str, Any]:
    """Train as the recipe says; returns a summary for run.json (or ``{"stopped": True}``)."""
    import deepspeed
    from tqdm import tqdm
    from transformers import AutoTokenizer, set_seed

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
    with stage(f"loading data.train={dc.train}" + (f" (limit {dc.train_limit})"
                                                   if dc.train_limit else "")):
        if dc.eval_split == "holdout":  # the first eval_limit shuffled examples never train
            limit = None if dc.train_limit is None else dc.train_limit + dc.eval_limit
            pool = load_examples(dc.train, split="train", limit=limit, seed=recipe.seed)
            eval_ex, train_ex = pool[:dc.eval_limit], pool[dc.eval_limit:]
        else:
            train_ex = load_examples(dc.train, split="train", limit=dc.train_limit,
                                     seed=recipe.seed)
            source = dc.eval or dc.train
            split = "eval" if has_eval_split(source) else "train"  # a separate eval file: all
            eval_ex = load_examples(source, split=split, limit=dc.eval_limit,
                                    seed=recipe.seed) if dc.eval_limit else []
    tok_kw = {"template": dc.template, "max_length": dc.max_length}
    with stage(f"tokenising {len(train_ex)} train and {len(eval_ex)} eval examples"):
        train_items = tokenize(train_ex, tokenizer, packing=dc.packing, **tok_kw)
        eval_items = tokenize(eval_ex, tokenizer, **tok_kw) if eval_ex else []
    collator = Collator(tokenizer)
    mb, gas = recipe.train.micro_batch_size, plan.grad_accum
    micro_per_epoch = len(batch_order(len(train_items), seed=recipe.seed, epoch=0, rank=rank,
                                      world=world, micro=mb))
    steps_per_epoch = micro_per_epoch // gas
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_items)} training examples make no full optimizer step of "
                         f"{plan.global_batch} examples; lower the batch or add data")
    total = recipe.max_steps or max(1, int(recipe.train.epochs * steps_per_epoch))
    say(f"data ready ({time.perf_counter() - t0:.0f} s): {len(train_items)} train / "
        f"{len(eval_items)} eval examples; global batch {plan.global_batch} = {mb} x {gas} x "
        f"{world}; {total} steps ({total / steps_per_epoch:.2f} epochs)")

    # Model. The calibration batches of LOI (and LoRA-GA) are shared out over the ranks and their
    # sketches (gradients) summed, so every rank builds the same model and none does all passes.
    per_rank = -(-recipe.init.batches // world)
    first = batch_order(len(train_items), seed=recipe.seed, epoch=0, rank=0, world=1, micro=mb)
    mine = first[: per_rank * world][rank::world]
    calibration = [_collate(train_items, idx, collator, device) for idx in mine]
    set_seed(recipe.seed)  # the same initial adapter on every rank
    mode = plan.load_mode
    how = {"whole": "whole on every rank", "zero3": "partitioned (ZeRO-3 zero.Init)",
           "fsdp2": "on the meta device, loaded after sharding"}[mode]
    with stage(f"loading {recipe.model.name_or_path} {how} with LoRA r={recipe.lora.r} and "
               f"{recipe.init.method} init"):
        model, finish = build_model(recipe, plan, calibration, device,
                                    reduce=(lambda t: dist.all_reduce(t)) if world > 1 else None,
                                    world=world, mode=mode)
    set_seed(recipe.seed + 1 + rank)  # then independent dropout masks per rank
    row = registry.spec(recipe.optimizer.name)
    manifold = row.layout == "manifold"
    lr_fn = lr_lambda(recipe, total)
    if recipe.engine == "deepspeed":
        eng = DeepSpeedEngine(model, build_optimizer(recipe, model), lr_fn, plan.deepspeed)
    else:
        eng = FSDP2Engine(model, lambda m: build_optimizer(recipe, m), lr_fn, gas,
                          recipe.train.gradient_clipping, device, manifold=manifold)

    if finish is not None:  # partitioned load: this rank's weights, then the adapters' start
        with stage(f"reading this rank's part of the base and {recipe.init.method} init"
                   if mode == "fsdp2" else f"{recipe.init.method} init on the partitioned model"):
            finish()
    rss_loaded = _peak_rss(rank, world)
    say(f"{recipe.engine} engine ready ({time.perf_counter() - t0:.0f} s); peak RSS per rank "
        f"{', '.join(f'{v:.0f}' for v in rss_loaded)} MiB")
    # Resume: the engine's state, then this rank's loop state and RNG streams.
    write_state, read_state = eng.io(exclude_frozen=True)
    start = 0
    trainable = _trainable(eng.module)
    if plan.resume_from is not None:
        try:
            read_state(plan.resume_from)
        except Exception as err:
            raise ckpt.CheckpointError(
                f"reading checkpoint {plan.resume_from} failed ({type(err).__name__}: {err}); "
                f"resume from an earlier one with resume=PATH or delete output_dir") from err
        state = ckpt.load_trainer_state(plan.resume_from, rank)
        ckpt.set_rng_state(state["rng"])
        start = int(state["step"])
        bad = torch.tensor([len(_nonfinite(trainable))], dtype=torch.float64)
        dist.all_reduce(bad)
        if bad.item():
            older = [p for p in ckpt.list_checkpoints(out / "checkpoints")
                     if p.name < plan.resume_from.name]
            fix = (f"resume from the newest earlier checkpoint with resume={older[-1]}"
                   if older else "no earlier checkpoint is left: delete output_dir to start over")
            raise RecipeError(f"checkpoint {plan.resume_from} holds non-finite values in "
                              f"{int(bad.item())} trainable tensors; {fix}")
        say(f"resumed from {plan.resume_from} at step {start}")
    metrics_path = out / "metrics.jsonl"
    if rank == 0:  # drop lines written after the checkpoint we resumed from (all: a fresh start)
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        kept = [ln for ln in lines if start and json.loads(ln).get("step", 0) <= start]
        write_text_atomically(metrics_path, "".join(ln + "\n" for ln in kept))

    trackers = Trackers(recipe.logging, out, rank=rank, start=start, config=run_info)

    def emit(record: dict[str, Any]) -> None:
        if rank == 0:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            trackers.write(record)

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
    allowance, skipped = _skip_allowance(recipe), 0
    newest = plan.resume_from
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
        # Divergence rides on the loss reduction: the count of non-finite trainable tensors.
        bad_params = _nonfinite(trainable)
        rss = [0.0] * world
        rss[rank] = peak_rss_mib() or 0.0
        reduced = torch.tensor([loss_sum / gas, tokens, len(bad_params), *rss],
                               dtype=torch.float64)
        dist.all_reduce(reduced)
        step_time = time.perf_counter() - t0
        loss_val, tokens_all = float(reduced[0] / world), int(reduced[1])
        grad_norm = eng.grad_norm()
        what = [w for w, bad in [("loss", not math.isfinite(loss_val)),
                                 ("gradient norm", grad_norm is not None
                                  and not math.isfinite(grad_norm))] if bad]
        if reduced[2]:  # the update itself is poisoned: nothing to skip
            bar.close()
            raise _divergence(step, lr, " and ".join(what + [f"values in {int(reduced[2])} "
                                                             f"trainable tensors"]), newest)
        if what:
            skipped += 1
            if skipped > allowance:
                bar.close()
                raise _divergence(step, lr, " and ".join(what), newest)
            if rank == 0:
                bar.write(f"[riemann_zero] step {step}: non-finite {' and '.join(what)}; the "
                          f"engine skipped the update ({skipped} of {allowance} allowed)")
        tokens_seen += tokens_all
        first_loss = loss_val if first_loss is None else first_loss
        last_loss = loss_val
        record = {"step": step, "loss": loss_val, "lr": lr, "tokens": tokens_all,
                  "tokens_per_s": tokens_all / step_time, "step_time_s": step_time,
                  "optim_time_s": optim_time, "epoch": (step * gas) / micro_per_epoch,
                  "peak_rss_mib": [round(float(v), 1) for v in reduced[3:]]}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if what:
            record["skipped"] = True
        if step % recipe.train.log_every == 0 or step == total:  # the same steps on every rank
            if row.health:
                record.update(_health(eng.client_optimizer))
            record.update(_comm(eng.client_optimizer))
            emit(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
        if recipe.train.eval_every and step % recipe.train.eval_every == 0 and step != total:
            emit({"step": step, "eval_loss": _eval_loss(eng, eval_items, collator, recipe, rank,
                                                        world)})
        if recipe.train.save_every and step % recipe.train.save_every == 0:
            t_save = time.perf_counter()
            expected = ckpt.checkpoint_bytes(newest) if newest else _state_bytes(trainable)
            newest = ckpt.save_checkpoint(
                out / "checkpoints", step, write_engine_state=write_state,
                trainer_state={"step": step, "micro_batches": step * gas}, rank=rank,
                barrier=dist.barrier, keep_last=recipe.train.keep_last, expected_bytes=expected)
            if rank == 0:
                bar.write(f"[riemann_zero] checkpoint {newest.name}: "
                          f"{ckpt.checkpoint_bytes(newest) / 2**20:.1f} MiB in "
                          f"{time.perf_counter() - t_save:.1f} s")
        if recipe.stop_after is not None and step == recipe.stop_after:
            bar.close()
            say(f"stopping after step {step} (stop_after)")
            trackers.close()
            return {"stopped": True}
    bar.close()
    eval_loss = _eval_loss(eng, eval_items, collator, recipe, rank, world)
    emit({"step": total, "eval_loss": eval_loss})
    trackers.close()
    if plan.trainable:
        _save_trained(eng, out / "trained", list(plan.trainable), rank=rank)
    else:
        _save_adapter(eng, out / "adapter", manifold=manifold, rank=rank)
    dist.barrier()
    return {"steps": total, "first_loss": first_loss, "final_loss": last_loss,
            "final_eval_loss": eval_loss, "tokens": tokens_seen, "load": mode,
            "peak_rss_mib_loaded": rss_loaded, "peak_rss_mib": _peak_rss(rank, world),
            "adapter": str(out / ("trained" if plan.trainable else "adapter"))}


def _save_adapter(eng, out_dir: Path, *, manifold: bool, rank: int) -> None:
    """A stock PEFT adapter relative to the original base (after LOI, PiSSA or LoRA-GA too)."""
    module = eng.module
    if manifold:
        save_adapter(module, out_dir)  # collective under ZeRO-3/FSDP2; rank 0 writes
        return
    state = None
    if isinstance(eng, FSDP2Engine):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
    lora = [p for n, p in module.named_parameters() if "lora_" in n]
    with gathered(lora):  # ZeRO-3 parameters made whole; a no-op elsewhere
        if rank == 0:
            save_peft_adapter(module, out_dir, state_dict=state)


def _save_trained(eng, out_dir: Path, names: list[str], rank: int) -> None:
    """Full fine-tuning: the trained parameters, whole, as ``out_dir/params.pt`` ({name: tensor})
    (FSDP2 DTensors and ZeRO-3 partitions gathered; rank 0 writes)."""
    named = dict(eng.module.named_parameters())
    params = [named[n] for n in names]
    with gathered(params):
        state = {n: full_tensor(p).detach().float().cpu().clone() for n, p in zip(names, params)}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, out_dir / "params.pt")
