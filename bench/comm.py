"""Communication of one Riemannion step under FSDP2 / ZeRO, next to the engine's own traffic.

Computed part (Llama-3-8B adapters on q, k, v, up, down of 32 layers; r = 8…64; world 8…1024): the
optimizer's bytes per step from the same shape model the tests check against the live counters
(``riemann_zero.sharding.accounting.step_bytes``; under ZeRO the busiest rank, ZeRO-1/2 with the
flat layout modelled by ``zero12_pieces``), next to (a) the engine's gradient reduction plus
parameter all-gather for the adapters and (b) a design that gathers every full factor (m×2r, n×2r)
before stepping. Measured part (``--measure``): a tiny Llama on gloo with world 2–4 under FSDP2,
ZeRO-2 and ZeRO-3, every rank's own counters after one step, and the prediction for that rank.

Bytes are payloads: what one rank hands to the collective per step (a ring all-reduce moves about
twice that over the wire, an all-gather or reduce-scatter about once).

Usage: ``python bench/comm.py [--measure]`` writes ``bench/results/comm.json`` (the computed rows,
and the measured ones with ``--measure``; without it the measured rows already in the file are
kept) and prints the Markdown tables that BENCHMARKS.md quotes, rendered from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from riemann_zero.sharding.accounting import (  # noqa: E402
    engine_grad_bytes,
    gather_factor_bytes,
    step_bytes,
    zero12_pieces,
)

# Llama-3-8B: hidden 4096, 8 KV heads × 128, MLP 14336, 32 layers. (m = out, n = in)
LLAMA3_8B = [(4096, 4096), (1024, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
LAYERS = 32
RESULTS = Path(__file__).resolve().parent / "results" / "comm.json"
LAYOUTS = ("fsdp2", "zero3", "zero12")


def shapes_8b(r: int) -> list[tuple[int, int, int]]:
    return [(m, n, r) for m, n in LLAMA3_8B] * LAYERS


def mib(x: float) -> str:
    return f"{x / 2**20:,.2f}"


def busiest(shapes: list[tuple[int, int, int]], layout: str, world: int) -> int:
    """The most bytes any rank hands to the optimizer's collectives in one step."""
    if layout == "fsdp2":  # the same on every rank
        return sum(step_bytes(shapes, layout, world).values())
    return max(sum(step_bytes(shapes, layout, world, rank,
                              zero12_pieces(shapes, world, rank) if layout == "zero12" else None
                              ).values()) for rank in range(world))


def computed_rows(ranks: tuple[int, ...] = (8, 16, 32, 64),
                  worlds: tuple[int, ...] = (8, 64, 1024)) -> list[dict]:
    """Per (r, world): the busiest rank's optimizer bytes per layout, the engine's adapter
    traffic and the gather-the-factors design, all in bytes."""
    rows = []
    for r in ranks:
        shapes = shapes_8b(r)
        for world in worlds:
            rows.append({"r": r, "world": world,
                         "optimizer_bytes": {lay: busiest(shapes, lay, world) for lay in LAYOUTS},
                         "engine_bytes": engine_grad_bytes(shapes, stage=3),
                         "gather_factors_bytes": gather_factor_bytes(shapes, world)})
    return rows


def ratios(rows: list[dict]) -> dict[tuple[int, int], dict[str, float]]:
    """{(r, world): {layout: optimizer bytes / engine bytes}}."""
    return {(row["r"], row["world"]): {lay: v / row["engine_bytes"]
                                       for lay, v in row["optimizer_bytes"].items()}
            for row in rows}


def computed_table(rows: list[dict]) -> str:
    """The Markdown table of :func:`computed_rows`."""
    lines = [
        "| r | world | FSDP2 optimizer | ZeRO-3 optimizer | ZeRO-1/2 optimizer "
        "| engine grads + param gather | optimizer / engine: FSDP2, ZeRO-3, ZeRO-1/2 "
        "| gather-the-factors design |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        got, eng = row["optimizer_bytes"], row["engine_bytes"]
        pct = ", ".join(f"{100 * got[lay] / eng:.2f} %" for lay in LAYOUTS)
        lines.append(f"| {row['r']} | {row['world']} | {mib(got['fsdp2'])} | {mib(got['zero3'])} "
                     f"| {mib(got['zero12'])} | {mib(eng)} | {pct} "
                     f"| {mib(row['gather_factors_bytes'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measured
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=32,
            tie_word_embeddings=False)
TINY_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _tiny_model(r: int):
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    import riemann_zero as rz

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY)).float()
    return rz.get_peft_model(base, LoraConfig(r=r, target_modules=TINY_TARGETS), init="random")


def _rank(rank: int, world: int, port: int, engine: str, r: int, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import riemann_zero as rz

    model = _tiny_model(r)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    if engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        opt = rz.Riemannion(model, lr=1e-3)
        eng, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": int(engine[-1]),
                                  "stage3_param_persistence_threshold": 0}})
        eng.backward(eng(input_ids=ids, labels=ids).loss)
        eng.step()
        inner = opt.optimizer if hasattr(opt, "optimizer") else opt
    else:
        from torch.distributed.fsdp import fully_shard

        from riemann_zero import fsdp_placement

        dist.init_process_group("gloo", rank=rank, world_size=world)
        place = fsdp_placement(model)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
        inner = rz.Riemannion(model, lr=1e-3)
        model(input_ids=ids, labels=ids).loss.backward()
        inner.step()
    shapes = [(ad.m, ad.n, ad.r) for ad in inner.adapters.values()]
    layout = {"zero2": "zero12"}.get(engine, engine)
    frags = ([inner.shards.pieces(ad) for ad in inner.adapters.values()]
             if layout == "zero12" else None)
    predicted = dict(step_bytes(shapes, layout, world, rank, frags))
    queue.put((rank, dict(inner.last_step_comm), predicted, engine_grad_bytes(shapes, 3),
               gather_factor_bytes(shapes, world)))
    dist.barrier()
    dist.destroy_process_group()


def measured_rows(r: int = 4) -> list[dict]:
    """Per engine and world: the busiest rank's own counters after one step (by collective),
    the shape model's prediction for that rank, whether every rank matched its prediction, and
    the engine's and the gather-the-factors design's bytes."""
    import torch.multiprocessing as mp

    rows = []
    ctx = mp.get_context("spawn")
    for engine in ("fsdp2", "zero2", "zero3"):
        for world in (2, 3, 4):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            queue = ctx.SimpleQueue()
            mp.start_processes(_rank, args=(world, port, engine, r, queue), nprocs=world,
                               start_method="spawn")
            ranks = sorted(queue.get() for _ in range(world))
            _, got, pred, eng, gat = max(ranks, key=lambda x: sum(x[1].values()))
            rows.append({"engine": engine, "world": world, "r": r, "measured": got,
                         "predicted": pred,
                         "every_rank_as_predicted": all(g == p for _, g, p, _, _ in ranks),
                         "engine_bytes": eng, "gather_factors_bytes": gat})
    return rows


def measured_table(rows: list[dict]) -> str:
    """The Markdown table of :func:`measured_rows`."""
    lines = ["| engine | world | measured optimizer, busiest rank | predicted | every rank as "
             "predicted | by collective (busiest rank) | engine grads + param gather "
             "| gather-the-factors |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        got, pred = row["measured"], row["predicted"]
        parts = ", ".join(f"{k.split('.')[-1]} {v:,}" for k, v in sorted(got.items()))
        same = "yes" if row["every_rank_as_predicted"] else "NO (MISMATCH)"
        lines.append(f"| {row['engine']} | {row['world']} | {sum(got.values()):,} B | "
                     f"{sum(pred.values()):,} B | {same} | {parts} | {row['engine_bytes']:,} B "
                     f"| {row['gather_factors_bytes']:,} B |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also run gloo worlds 2-4")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON written")
    args = parser.parse_args(argv)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record = {"computed": computed_rows(),
              "measured": measured_rows() if args.measure else previous.get("measured")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print("### Llama-3-8B adapters (q, k, v, up, down × 32 layers), MiB per step per rank\n")
    print(computed_table(record["computed"]))
    at64 = ratios(record["computed"])[16, 64]
    print(f"\nTarget (r = 16, world 64): optimizer / engine adapter traffic = "
          f"{100 * at64['zero3']:.2f} % under ZeRO-3, {100 * at64['zero12']:.2f} % under "
          f"ZeRO-1/2, {100 * at64['fsdp2']:.2f} % under FSDP2 (target <= 5 % under ZeRO-1/2/3: "
          f"{'met' if max(at64['zero3'], at64['zero12']) <= 0.05 else 'NOT met'})")
    if record["measured"]:
        print("\n### Measured on gloo (tiny Llama, hidden 64, r = 4), bytes per step per rank\n")
        print(measured_table(record["measured"]))


if __name__ == "__main__":
    main(sys.argv[1:])
