"""How much memory a recipe needs per rank, estimated before any weight loads.

From the model built on the meta device, the engine and ZeRO stage, the world and the batch:

- **base**: the frozen weights; whole on every rank under ZeRO-0/1/2, ``1/world`` of them under
  ZeRO-3 and FSDP2 (``partitioned``), which then also hold **gathered**: the layers being
  computed, made whole (FSDP2: two decoder layers, current and prefetched, plus the root's
  embedding, norm and head; ZeRO-3: two of the largest of a decoder layer, the embedding and
  the head);
- **adapters**, their **gradients** (ZeRO-2/3 and FSDP2 keep ``1/world`` of them in fp32, plus
  one reduce bucket in the model dtype) and the **optimizer** state: the registry row's
  ``state_per_value`` fp32 values per trainable value (AdamW 2, Riemannion 0.5: its momentum
  factors) plus an fp32 master copy under bf16 or ZeRO-1/2/3, ``1/world`` of it from ZeRO-1 on;
- **activations** of one micro-batch of ``data.max_length`` tokens: per decoder layer the
  tensors backward keeps (norm inputs and outputs, q/k/v/o, the MLP's four ``intermediate``
  wide tensors, the LoRA inputs dropout copies), only the layer inputs under gradient
  checkpointing (plus one layer recomputed), and the logits (model dtype, their fp32 copy, the
  log-softmax and its gradient);
- **runtime**: the process itself (Python, torch and the libraries; on a GPU the CUDA context and
  the communicator) — a constant measured on this project's machines, not derived.

On a GPU the per-rank total is compared with the free memory of this rank's device and the host
side (runtime, the weights as loaded before they move to the device, ZeRO offload) times the
node's local ranks with ``MemAvailable``; on CPU everything is host memory, summed over the local
ranks. Estimates, not bounds: allocator fragmentation, DeepSpeed's buckets beyond the first and
temporary copies are not modelled (see README, "Memory estimate", for the measured error).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from riemann_zero.optim import registry
from riemann_zero.train.engines import Engine, engine_for
from riemann_zero.train.recipe import Recipe

__all__ = ["MemoryEstimate", "estimate_memory", "memory_limits", "memory_error",
           "RUNTIME_CPU", "RUNTIME_GPU", "RUNTIME_GPU_HOST"]

GIB = 2**30
# Resident memory of one driver process before its model loads (Python, torch, transformers,
# peft, deepspeed, gloo, the tokenised data): VmHWM 0.39 GiB after the imports and 0.58-0.61 GiB
# once the commonsense data is loaded, measured in the driver on the 2-core CPU machine; 0.6 GiB.
RUNTIME_CPU = int(0.6 * GIB)
# On a GPU: the CUDA context, cuBLAS workspace and NCCL buffers (about 1 GiB per process is the
# usual figure for recent CUDA; not measured here), and the host side of the same process.
RUNTIME_GPU = 1 * GIB
RUNTIME_GPU_HOST = 2 * GIB


@dataclass
class MemoryEstimate:
    """Bytes per rank by part, and where they live.

    Attributes:
        device: per-rank bytes on the accelerator (on CPU: in host memory), by part.
        host: per-rank bytes in host memory besides ``device`` (GPU runs: runtime, loading,
            offload), by part.
        local_ranks: processes per node (the host side is summed over them).
        on_gpu: whether ``device`` is accelerator memory.
        notes: the assumptions that set the figures (engine, partitioning, dtype, batch).
    """

    device: dict[str, int]
    host: dict[str, int]
    local_ranks: int
    on_gpu: bool
    notes: list[str] = field(default_factory=list)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def node_host_total(self) -> int:
        """Host bytes of one node: its local ranks' host parts (on CPU: everything)."""
        per_rank = sum(self.host.values()) + (0 if self.on_gpu else self.device_total)
        return self.local_ranks * per_rank

    def table(self) -> str:
        """A compact table (GiB) for rank 0 to print before loading."""
        where = "GPU" if self.on_gpu else "host (CPU run)"
        rows = [f"memory estimate per rank, {where} ({'; '.join(self.notes)}):"]
        rows += [f"  {k:<12}{v / GIB:9.2f} GiB" for k, v in self.device.items()]
        rows.append(f"  {'total':<12}{self.device_total / GIB:9.2f} GiB")
        if self.on_gpu:
            rows.append("  host per rank: " + ", ".join(
                f"{k} {v / GIB:.2f}" for k, v in self.host.items()) + " GiB")
        rows.append(f"  host per node ({self.local_ranks} ranks): "
                    f"{self.node_host_total / GIB:.2f} GiB")
        return "\n".join(rows)


def _meta_counts(model_config: Any) -> dict[str, Any]:
    """Parameter counts of the model built on the meta device: total, the largest decoder layer,
    the embedding and the head, and the rest (outside the decoder layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    layer = max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    head = 0 if head is None or head.weight is model.get_input_embeddings().weight \
        else head.weight.numel()
    return {"total": total, "layer": layer, "n_layers": len(layers), "embed": embed,
            "head": head, "root": total - sum(sum(p.numel() for p in m.parameters())
                                              for m in layers)}


def _trainable_count(rc: Recipe, shapes: dict[str, tuple[int, int]],
                     trainable: dict[str, tuple[int, ...]]) -> tuple[int, dict[str, int]]:
    """Trainable values in all, and the summed input width of the adapted Linear layers per
    decoder layer (what LoRA dropout copies), from the target shapes."""
    import math

    if trainable:  # full fine-tuning of the matched parameters
        return sum(math.prod(s) for s in trainable.values()), {}
    hits = {n: s for n, s in shapes.items()
            if any(n == t or n.endswith("." + t) for t in rc.lora.target_modules)}
    inputs: dict[str, int] = {}
    for name, (_, n) in hits.items():
        layer = name.rsplit(".", 2)[0]
        inputs[layer] = inputs.get(layer, 0) + n
    if rc.adapter.type != "lora":  # OFT/BOFT: about b(b-1)/2 values per block of b inputs
        key = "oft_block_size" if rc.adapter.type == "oft" else "boft_block_size"
        block = int(rc.adapter.config.get(key) or 32)
        return sum(n * (block - 1) // 2 for _, n in hits.values()), inputs
    rank = 2 * rc.lora.r if registry.spec(rc.optimizer.name).layout == "manifold" else rc.lora.r
    return sum(rank * (m + n) for m, n in hits.values()), inputs


def _layer_activations(cfg: Any) -> int:
    """Values per token one decoder layer keeps for backward (Llama-like: pre-norm attention
    and a gated MLP). Norm in/out 2h twice; q, k, v and their rotated copies; the attention
    output and the k/v repeated to all heads; o_proj's output; the MLP's gate, up, activation
    and product (4 · intermediate); the residual."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kvw = kv * head_dim
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    return 4 * h + (h + 2 * kvw) + (h + kvw) + 3 * h + h + 4 * inter + h


def estimate_memory(rc: Recipe, model_config: Any, *, world: int, local_ranks: int,
                    on_gpu: bool, shapes: dict[str, tuple[int, int]],
                    trainable: dict[str, tuple[int, ...]] | None = None,
                    partitioned: bool | None = None, engine: Engine | None = None
                    ) -> MemoryEstimate:
    """Estimate the memory of one rank of this recipe.

    Args:
        rc: the recipe (engine, ZeRO stage and offload, dtype, batch, checkpointing, adapters).
        model_config: the model's ``transformers`` config (built on the meta device here).
        world: data-parallel ranks.
        local_ranks: ranks on one node (the host side is summed over them).
        on_gpu: accelerator run (False: everything is host memory).
        shapes: the Linear layers' (out, in) shapes (preflight's ``linear_shapes``).
        trainable: full fine-tuning's matched parameters (``model.trainable``), else None.
        partitioned: whether each rank holds ``1/world`` of the base; None: as the engine
            does (ZeRO-3, FSDP2).
        engine: the recipe's engine (None: looked up from the recipe); it says what it keeps.
    """
    engine = engine or engine_for(rc)
    facts = engine.memory_facts()
    if partitioned is None:
        partitioned = facts.partitions_base
    bf16 = bool((rc.deepspeed.get("bf16", {}) or {}).get("enabled", False))
    w = {"auto": 2 if bf16 else 4, "float32": 4, "bfloat16": 2}[rc.model.dtype]
    counts = _meta_counts(model_config)
    n_train, lora_inputs = _trainable_count(rc, shapes, trainable or {})
    base_count = counts["total"] - (n_train if trainable else 0)
    part = world if partitioned else 1
    state_div = world if facts.shards_state else 1

    device: dict[str, int] = {"runtime": RUNTIME_GPU if on_gpu else RUNTIME_CPU}
    device["base"] = base_count * w // part
    if partitioned:
        device["gathered"] = engine.gathered_values(counts) * w
    device["adapters"] = n_train * w // part
    device["gradients"] = engine.gradient_bytes(n_train, w, world)
    state = registry.spec(rc.optimizer.name).state_per_value
    master = 1 if (bf16 or w == 2 or facts.master_copy) else 0
    device["optimizer"] = int((state + master) * n_train * 4) // state_div

    b, s = rc.train.micro_batch_size, rc.data.max_length
    per_layer = _layer_activations(model_config)
    if lora_inputs and rc.lora.lora_dropout > 0:  # dropout's copy of each adapted input
        per_layer += sum(lora_inputs.values()) // len(lora_inputs)
    h, n_layers = model_config.hidden_size, counts["n_layers"]
    # Under checkpointing: the layer inputs, plus one layer recomputed.
    kept = n_layers * h + per_layer if rc.model.gradient_checkpointing else n_layers * per_layer
    vocab = model_config.vocab_size
    device["activations"] = b * s * kept * w + b * s * vocab * (2 * w + 3 * 4)

    host: dict[str, int] = {}
    if on_gpu:
        host["runtime"] = RUNTIME_GPU_HOST
        host["loading"] = base_count * w // part  # from_pretrained reads into host memory first
    if facts.offload_optimizer:
        host["offload"] = device.pop("optimizer")
    if facts.offload_param and partitioned:
        host["offload"] = host.get("offload", 0) + device.pop("base")
    if not on_gpu:  # one memory: what was offloaded stays in it
        device.update({f"{k} (offload)": v for k, v in host.items()})
        host = {}
    notes = [f"{engine.where()}, base {'1/' + str(world) if partitioned else 'whole'} per rank",
             f"{'bf16' if w == 2 else 'fp32'} weights",
             f"micro-batch {b} x {s} tokens",
             f"gradient checkpointing {'on' if rc.model.gradient_checkpointing else 'off'}"]
    return MemoryEstimate(device=device, host=host, local_ranks=local_ranks, on_gpu=on_gpu,
                          notes=notes)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_limits(rc: Recipe, on_gpu: bool) -> tuple[int | None, int | None]:
    """``(device, host)`` bytes to check against: the recipe's ``memory.device_gib`` /
    ``memory.host_gib`` when set; else this rank's free GPU memory (``torch.cuda.mem_get_info``
    on ``LOCAL_RANK``'s device) and ``MemAvailable`` of ``/proc/meminfo``. None: unknown."""
    mc = rc.memory
    device = int(mc.device_gib * GIB) if mc.device_gib is not None else None
    if device is None and on_gpu:
        import torch

        device = int(torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))[0])
    host = int(mc.host_gib * GIB) if mc.host_gib is not None else _mem_available()
    return device, host


def memory_error(est: MemoryEstimate, device_limit: int | None, host_limit: int | None, *,
                 world: int) -> str | None:
    """One line naming the figure that does not fit and the fixes (None if everything fits)."""
    fixes = ("run on more ranks (the base and optimizer state shrink with the world under "
             "ZeRO-3 / FSDP2), use deepspeed.zero_optimization.stage=3 or engine=fsdp2, "
             "model.gradient_checkpointing=true or a smaller train.micro_batch_size; or "
             "memory.check=false to train anyway")
    biggest = max(est.device, key=est.device.get)
    if est.on_gpu and device_limit is not None and est.device_total > device_limit:
        return (f"memory estimate: {est.device_total / GIB:.1f} GiB per rank (largest part: "
                f"{biggest} {est.device[biggest] / GIB:.1f} GiB) exceeds the "
                f"{device_limit / GIB:.1f} GiB of device memory at world size {world}; {fixes}")
    if host_limit is not None and est.node_host_total > host_limit:
        what = "host memory" if est.on_gpu else "memory (CPU run)"
        parts = est.host if est.on_gpu else est.device
        biggest = max(parts, key=parts.get)
        return (f"memory estimate: {est.node_host_total / GIB:.1f} GiB of {what} per node "
                f"({est.local_ranks} ranks; largest part per rank: {biggest} "
                f"{parts[biggest] / GIB:.1f} GiB) exceeds the {host_limit / GIB:.1f} GiB "
                f"available at world size {world}; {fixes}")
    return None
