"""Multi-process Tensorion worker for the distributed tests (CPU, gloo).

``python tests/distributed/tensorion_worker.py SPEC.json`` spawns ``world`` ranks; each runs every
case of the spec (engine in ddp/zero1/zero2/zero3/fsdp2, gradient accumulation) on the same tiny
from-scratch Qwen3-MoE, fine-tuning layer 0's fused expert stacks (two 3-D tensors: at world 3
one rank owns no tensor) and every RMSNorm weight (1-D: the internal AdamW), and rank 0 writes
``OUT/<case>.pt`` with the final trained tensors, the bytes by collective of every step and the
chosen unfoldings. ``--reference`` runs the single-process optimizer on the whole global batch.

Data: step s uses ``DATA[s]`` of ``world × PER_RANK`` sequences ordered [rank][micro][sample],
all of one length, so the mean of micro-batch mean losses is the global mean loss.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

SEQ, VOCAB, PER_RANK = 8, 64, 4
MOE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
           num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
           max_position_embeddings=32, tie_word_embeddings=False)
TRAINABLE = ("model.layers.0.mlp.experts.", "norm.weight")
# Online selection, reselected every 2 steps, so the broadcast unfolding and its kept state are
# both exercised.
OPT = dict(lr=0.05, momentum=0.9, weight_decay=0.01, unfolding="online", reselect_every=2,
           nesterov=True)


def build():
    """The tiny MoE, identical on every rank; only TRAINABLE parameters require grad."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE)).float()
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in TRAINABLE))
    return model


def trained_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def data(world: int, steps: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (steps, world * PER_RANK, SEQ), generator=gen)


def optimizer(model):
    import riemann_zero as rz

    return rz.Tensorion([p for p in model.parameters() if p.requires_grad], **OPT)


def reference(spec: dict) -> dict:
    torch.set_num_threads(1)
    model = build()
    opt = optimizer(model)
    for batch in data(spec["world"], spec["steps"]):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"params": {n: p.detach().double().clone() for n, p in model.named_parameters()
                       if p.requires_grad},
            "unfoldings": {k: st["unfolding"] for k, st in opt.named_state.items()}}


def _ds_config(stage: int, gas: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": PER_RANK // gas,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _gather(model, names: list[str], engine: str) -> dict[str, torch.Tensor]:
    from riemann_zero.sharding.params import full_tensor, gathered

    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    with gathered(params):
        return {n: full_tensor(p).detach().double().clone() for n, p in zip(names, params)}


def run_case(case: dict, spec: dict, rank: int, out: Path) -> None:
    import torch.distributed as dist

    world, steps, engine, gas = spec["world"], spec["steps"], case["engine"], case.get("gas", 1)
    micro = PER_RANK // gas
    model = build()
    names = trained_names(model)
    if engine.startswith("zero"):
        import deepspeed

        eng, opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer(model),
                                              config=_ds_config(int(engine[-1]), gas))
        inner = opt.optimizer if hasattr(opt, "optimizer") else opt
        target = eng.module
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        inner = opt = optimizer(model)
        target = model
    elif engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        inner = opt = optimizer(model)
        target = model
    else:
        raise ValueError(f"unknown engine {engine!r}")
    # The tensors whose direction this rank computes (the momenta it receives as their owner),
    # seen at the optimizer's own hand-over from momenta to directions.
    computes: set[str] = set()
    directions = inner._directions

    def observed(group, entries, owned):
        computes.update(entries[i][0] for i in owned)
        return directions(group, entries, owned)

    inner._directions = observed
    comm = []
    for batch in data(world, steps):
        mine = batch[rank * PER_RANK:(rank + 1) * PER_RANK]
        for j in range(gas):
            mb = mine[j * micro:(j + 1) * micro]
            if engine.startswith("zero"):
                eng.backward(eng(input_ids=mb, labels=mb).loss)
                eng.step()
            elif engine == "ddp":
                if j < gas - 1:
                    with ddp.no_sync():
                        (ddp(input_ids=mb, labels=mb).loss / gas).backward()
                else:
                    (ddp(input_ids=mb, labels=mb).loss / gas).backward()
            else:
                (model(input_ids=mb, labels=mb).loss / gas).backward()
        if not engine.startswith("zero"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        comm.append(dict(inner.last_step_comm))
    result = {"params": _gather(target, names, engine), "comm": comm,
              "unfoldings": {k: st.get("unfolding") for k, st in inner.named_state.items()},
              "holds": sorted(k for k, st in inner.named_state.items()
                              if st["momentum"].numel() > 0)}
    results = [None] * world
    dist.all_gather_object(results, {"unfoldings": result["unfoldings"],
                                     "holds": result["holds"], "computes": sorted(computes)})
    result["unfoldings_by_rank"] = [r["unfoldings"] for r in results]
    result["holds_by_rank"] = [r["holds"] for r in results]
    result["computes_by_rank"] = [r["computes"] for r in results]
    if rank == 0:
        torch.save(result, out / f"{case['name']}.pt")
    dist.barrier()


def _rank_main(rank: int, spec: dict, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec["world"]),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    if any(c["engine"].startswith("zero") for c in spec["cases"]):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=spec["world"])
    try:
        for case in spec["cases"]:
            run_case(case, spec, rank, Path(out))
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    if "--reference" in argv:
        torch.save(reference(spec), out / "reference.pt")
        return
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(spec, spec["port"], str(out)), nprocs=spec["world"], join=True)


if __name__ == "__main__":
    main(sys.argv[1:])
