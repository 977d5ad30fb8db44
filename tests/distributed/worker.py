"""Multi-process training worker for the distributed tests (CPU, gloo).

``python tests/distributed/worker.py SPEC.json`` spawns ``world`` ranks; each rank runs every case
of the spec in turn (engine in zero1/zero2/zero3/fsdp2, gradient accumulation, LOI) on the same
tiny random Llama and the same data, and rank 0 writes ``OUT/<case>.pt`` with the final points X
(m×n, built from the gathered factors), every rank's optimizer bytes by collective at every step
(and, under ZeRO, every rank's fragments of each adapter) and, if asked, a saved adapter with the
trained model's logits on :func:`probe_ids`.
``python tests/distributed/worker.py SPEC.json --reference`` runs the single-process Riemannion on
the whole global batch instead (no engine), for comparison. A case with ``"model": "narrow"``
trains :data:`NARROW` instead (a 2-wide Llama, r = 1: n < world).

Data layout: step s uses the global batch ``DATA[s]`` of ``world × MICRO × gas`` sequences,
ordered [rank][micro-batch][sample]; every sequence has the same length, so the mean of the
micro-batch mean losses equals the global mean loss the reference optimises.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

SEQ, VOCAB, PER_RANK = 8, 64, 4  # PER_RANK = micro-batch size × gradient accumulation steps
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]
LLAMA = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=1, head_dim=4, max_position_embeddings=32,
             tie_word_embeddings=False)
OPT = dict(lr=0.02, momentum=0.9, weight_decay=0.01)
# n = 2 < world 3, r = 1: at world 3 rank 0 owns no column of lora_A (an empty row block of Aᵀ),
# ZeRO-3 chunks of 2 leave rank 2 without any element of lora_A or lora_B, FSDP2 keeps lora_A on
# Shard(0) (3 ∤ 2) with its 2 rows on ranks 0 and 1.
NARROW = dict(hidden_size=2, intermediate_size=2, num_attention_heads=1, num_key_value_heads=1,
              head_dim=2)


def model_of(case: dict, spec: dict) -> tuple[int, dict]:
    """(r, config overrides) of the case's model: the spec's r and LLAMA, or NARROW with r = 1."""
    return (1, NARROW) if case.get("model") == "narrow" else (spec["r"], {})


def ref_key(case: dict) -> str:
    """Key of the reference run a case compares with (same model, same LOI)."""
    tag = "narrow_" if case.get("model") == "narrow" else ""
    return f"{tag}loi{int(bool(case.get('loi', False)))}"


def build(r: int, llama: dict | None = None):
    """The tiny Llama with manifold adapters (k_proj/v_proj have m = 4 rows: empty FSDP2 shards
    at world 3), identical on every rank; ``llama`` overrides config entries."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    import riemann_zero as rz

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **(llama or {})})).float()
    return rz.get_peft_model(base, LoraConfig(r=r, target_modules=TARGETS), init="random",
                             init_scale=0.05)


def data(world: int, steps: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (steps, world * PER_RANK, SEQ), generator=gen)


def calibration(world: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, VOCAB, (2, world * PER_RANK, SEQ), generator=gen)


def probe_ids() -> torch.Tensor:
    """Fixed input ids on which a saved adapter is checked against the trained model."""
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))


def points(model) -> dict[str, torch.Tensor]:
    import riemann_zero as rz

    return {k: v.detach().double().clone() for k, v in rz.manifold_points(model).items()}


def reference(spec: dict) -> dict:
    """Single process, no engine, whole global batch per step."""
    import riemann_zero as rz

    torch.set_num_threads(1)
    world, steps = spec["world"], spec["steps"]
    out = {}
    for key, case in {ref_key(c): c for c in spec["cases"]}.items():
        loi = bool(case.get("loi", False))
        model = build(*model_of(case, spec))
        if loi:
            rz.loi_init(model, [{"input_ids": b, "labels": b} for b in calibration(world)])
        probe = calibration(world)[0]
        with torch.no_grad():  # the loss at step 0 (after LOI)
            loss = float(model(input_ids=probe, labels=probe).loss)
        opt = rz.Riemannion(model, **OPT)
        for batch in data(world, steps):
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[key] = {"points": points(model), "loss_step0": loss}
        if spec.get("save_reference"):
            rz.save_adapter(model, Path(spec["out"]) / f"reference_{key}_adapter")
    return out


def _ds_config(stage: int, gas: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": PER_RANK // gas,
        "gradient_accumulation_steps": gas,
        # persistence 0: even tiny weights are partitioned (else ZeRO-3 keeps them whole)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _loi(model, world: int, rank: int) -> None:
    """LOI on this rank's share of the calibration batches, sketches summed over ranks."""
    import riemann_zero as rz
    from riemann_zero import sketch_reduce

    batches = [b[rank * PER_RANK:(rank + 1) * PER_RANK] for b in calibration(world)]
    rz.loi_init(model, [{"input_ids": b, "labels": b} for b in batches], reduce=sketch_reduce())


def _zero3_shift(spec: dict, rank: int, out: Path, name: str) -> None:
    """LOI's base shift on ZeRO-3-partitioned weights (uneven chunks): shift_base touches only
    this rank's chunk; the gathered result must equal W − B₀A₀ formed on the whole weight."""
    import deepspeed
    import torch.distributed as dist

    import riemann_zero as rz
    from riemann_zero.sharding.params import shift_base

    model = build(spec["r"])
    gen = torch.Generator().manual_seed(3)
    want, factors = {}, {}
    for ad in rz.find_adapters(model):
        b0, a0 = torch.randn(ad.m, ad.r, generator=gen), torch.randn(ad.r, ad.n, generator=gen)
        factors[ad.name] = (b0, a0)
        want[ad.name] = ad.module.get_base_layer().weight.detach() - b0 @ a0
    deepspeed.initialize(model=model, optimizer=rz.Riemannion(model, **OPT),
                         config=_ds_config(3, 1))
    err, partitioned = 0.0, True
    for ad in rz.find_adapters(model):
        weight = ad.module.get_base_layer().weight
        partitioned &= weight.ds_tensor.numel() < weight.ds_numel
        shift_base(weight, *factors[ad.name])
        with deepspeed.zero.GatheredParameters([weight]):
            err = max(err, float((weight.detach() - want[ad.name]).abs().max()))
    if rank == 0:
        torch.save({"shift_err": err, "partitioned": partitioned}, out / f"{name}.pt")
    dist.barrier()


def save_base(folder: Path) -> None:
    """The worker model's base (the weights :func:`build` starts from) as a safetensors folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).float().save_pretrained(folder)


def _partitioned(engine: str, spec: dict, folder: Path):
    """The worker model built as the driver's partitioned loading does (riemann_zero.train.
    loading): ZeRO-3 under zero.Init, or FSDP2 on the meta device then sharded and read; each
    rank reads only its part of ``folder``. Returns (model, engine, facts); facts compares every
    base weight with the whole-model build and records how the weights are partitioned."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from peft import LoraConfig

    import riemann_zero as rz
    from riemann_zero.adapters.layout import init_points
    from riemann_zero.sharding.params import full_tensor, gathered
    from riemann_zero.train.engines.loading import create_base, materialize

    world = dist.get_world_size()
    mode = "zero3" if engine == "zero3" else "fsdp2"
    plan = SimpleNamespace(model_path=str(folder), deepspeed=_ds_config(3, 1))
    base, prefixes = create_base(plan, mode, torch.float32, "cpu")
    chunks = {n: (int(p.ds_tensor.numel()), int(p.data.numel()), int(p.ds_numel))
              for n, p in base.named_parameters()} if mode == "zero3" else {}
    model = rz.get_peft_model(base, LoraConfig(r=spec["r"], target_modules=TARGETS),
                              init="random", init_scale=0.05)
    if mode == "zero3":
        import deepspeed

        eng, opt, _, _ = deepspeed.initialize(model=model, optimizer=rz.Riemannion(model, **OPT),
                                              config=_ds_config(3, 1))
    else:
        from torch.distributed.fsdp import fully_shard

        place = rz.fsdp_placement(model)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
        materialize(model, plan, prefixes, "cpu")
        init_points(rz.find_adapters(model), "random", seed=0, init_scale=0.05)
        eng = opt = rz.Riemannion(model, **OPT)
    reference = build(spec["r"])
    whole = dict(reference.named_parameters())
    err = 0.0
    for name, p in model.named_parameters():
        with gathered([p]):
            err = max(err, float((full_tensor(p).detach() - whole[name].detach()).abs().max()))
    with torch.no_grad():
        logits = reference(input_ids=calibration(world)[0]).logits
    facts = {"weights_err": err, "chunks": chunks, "world": world, "whole_logits": logits}
    return model, eng, opt, facts


def run_case(case: dict, spec: dict, rank: int, out: Path) -> None:
    import torch.distributed as dist

    import riemann_zero as rz

    if case["engine"] == "zero3_shift":
        _zero3_shift(spec, rank, out, case["name"])
        return
    if case.get("partitioned"):
        _run_partitioned(case, spec, rank, out)
        return

    world, steps, engine, gas = spec["world"], spec["steps"], case["engine"], case.get("gas", 1)
    loi = bool(case.get("loi", False))
    micro = PER_RANK // gas
    model = build(*model_of(case, spec))
    # LOI before deepspeed.initialize (LOI's own backward passes would run through ZeRO's
    # gradient hooks); under FSDP2 it runs on the sharded model (partitioned base shift).
    if loi and engine.startswith("zero"):
        _loi(model, world, rank)
    if engine.startswith("zero"):
        import deepspeed

        opt = rz.Riemannion(model, **OPT)
        eng, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                              config=_ds_config(int(engine[-1]), gas))
        inner = opt.optimizer if hasattr(opt, "optimizer") else opt
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        from riemann_zero import fsdp_placement

        place = fsdp_placement(model)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
        if loi:
            _loi(model, world, rank)
        inner = opt = rz.Riemannion(model, **OPT)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    comm = []
    for batch in data(world, steps):
        mine = batch[rank * PER_RANK:(rank + 1) * PER_RANK]
        for j in range(gas):
            mb = mine[j * micro:(j + 1) * micro]
            if engine.startswith("zero"):
                eng.backward(eng(input_ids=mb, labels=mb).loss)
                eng.step()
            else:
                (model(input_ids=mb, labels=mb).loss / gas).backward()
        if engine == "fsdp2":
            opt.step()
            opt.zero_grad(set_to_none=True)
        comm.append(dict(inner.last_step_comm))
    target = eng.module if engine.startswith("zero") else model
    # Every rank's bytes (they differ: the exchange moves each rank's own fragments) and, under
    # ZeRO, its fragments of every adapter (what the byte model needs for ZeRO-1/2).
    shards = inner.shards
    mine = {"comm": comm, "fragments": [shards.pieces(ad) for ad in inner.adapters.values()]
            if hasattr(shards, "pieces") else None,
            # what the optimizer itself counted: steps per adapter, bytes over the whole run
            "adapter_steps": {k: int(st.get("step", 0)) for k, st in inner.named_state.items()},
            "comm_total": dict(inner.comm_total)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    result = {"points": points(target), "comm": comm, "layout": type(shards).__name__,
              "comm_by_rank": [e["comm"] for e in everyone],
              "adapter_steps_by_rank": [e["adapter_steps"] for e in everyone],
              "comm_total_by_rank": [e["comm_total"] for e in everyone],
              "fragments_by_rank": [e["fragments"] for e in everyone]}
    if case.get("save"):
        rz.save_adapter(target, out / f"{case['name']}_adapter")
        target.eval()
        with torch.no_grad():  # the trained model's logits on probe_ids(); collective (ZeRO-3)
            result["logits"] = target(input_ids=probe_ids()).logits.detach().float().clone()
    if rank == 0:
        torch.save(result, out / f"{case['name']}.pt")
    dist.barrier()


def _run_partitioned(case: dict, spec: dict, rank: int, out: Path) -> None:
    """Partitioned loading, then LOI on the partitioned model (the driver's order: after the
    engine laid the weights out), then the usual training steps (gas 1)."""
    import torch.distributed as dist

    world, engine = spec["world"], case["engine"]
    model, eng, opt, facts = _partitioned(engine, spec, out / "base")
    probe = calibration(world)[0]
    with torch.no_grad():  # the loaded model's logits, before LOI: the whole model's
        facts["logits"] = model(input_ids=probe).logits.detach().clone()
    if case.get("loi", False):
        _loi(model, world, rank)
    with torch.no_grad():  # the loss at step 0, after LOI
        facts["loss_step0"] = float(model(input_ids=probe, labels=probe).loss)
    inner = opt.optimizer if hasattr(opt, "optimizer") else opt
    comm = []
    for batch in data(world, spec["steps"]):
        mine = batch[rank * PER_RANK:(rank + 1) * PER_RANK]
        if engine == "zero3":
            eng.backward(eng(input_ids=mine, labels=mine).loss)
            eng.step()
        else:
            model(input_ids=mine, labels=mine).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        comm.append(dict(inner.last_step_comm))
    result = {"points": points(model), "comm": comm, **facts}
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
        if any(c.get("partitioned") for c in spec["cases"]):
            save_base(out / "base")
        return
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(spec, spec["port"], str(out)), nprocs=spec["world"], join=True)


if __name__ == "__main__":
    main(sys.argv[1:])
