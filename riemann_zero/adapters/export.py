"""Export: the one writer of stock PEFT adapters, relative to the ORIGINAL base model.

Two kinds of models reach it:

- manifold adapters (:func:`save_adapter`): ΔW = U Kᵀ (+ Z Vᵀ if something else stepped Z), and
  after LOI the base was moved by ΔW₀ = B₀A₀, so the adapter on the original base is
  ΔW − ΔW₀ = [U | B₀] [K | −A₀ᵀ]ᵀ;
- stock PEFT LoRA models of the baselines (:func:`save_peft_adapter`): as PEFT saves them, and
  after PiSSA or LoRA-GA moved the base by s·B₀A₀, rewritten as PEFT's own
  ``path_initial_model_for_weight_conversion`` does: s(BA − B₀A₀) = s [B | −B₀] [A ; A₀], rank
  2r, alpha doubled so that s is unchanged.

Both end in :func:`write_peft_adapter`: ``adapter_model.safetensors`` + ``adapter_config.json``
in a folder written atomically, which ``peft.PeftModel.from_pretrained`` (and lm-eval ``peft=``,
vLLM) load without importing riemann_zero.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from riemann_zero.adapters.inits import INITIAL_ATTR
from riemann_zero.adapters.layout import Adapter, find_adapters
from riemann_zero.io import write_dir_atomically
from riemann_zero.sharding.params import full_tensor, gathered

__all__ = ["write_peft_adapter", "save_adapter", "save_peft_adapter", "relative_to_original"]


def write_peft_adapter(out_dir: str | os.PathLike, tensors: dict[str, Tensor], config: Any,
                       meta: dict | None = None, files: dict[str, Any] | None = None) -> Path:
    """Write ``tensors`` (PEFT's saved key names) and a PEFT config as a stock adapter folder,
    atomically; ``meta`` (if any) goes to ``riemann_zero.json`` beside them, and each entry of
    ``files`` ({name: JSON data}, e.g. ``merge.json``) to a file of that name."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def build(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if meta is not None:
            (tmp / "riemann_zero.json").write_text(json.dumps(meta, indent=1))
        for name, data in (files or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=1, default=str) + "\n")

    return write_dir_atomically(out_dir, build)


def _export_factors(ad: Adapter) -> tuple[Tensor, Tensor]:
    """(B, A) of a plain LoRA equal to this adapter's ΔW relative to the original base weight."""
    with gathered([ad.lora_A, ad.lora_B]):
        b = full_tensor(ad.lora_B).detach().float().cpu() * ad.scaling
        a = full_tensor(ad.lora_A).detach().float().cpu()
    r = ad.r
    blocks_b, blocks_a = [b[:, r:]], [a[r:]]
    if b[:, :r].abs().max() > 0:  # Z ≠ 0 only if something other than our optimizer stepped it
        blocks_b.append(b[:, :r])
        blocks_a.append(a[:r])
    b0 = getattr(ad.module, "loi_B0", None)
    if b0 is not None:
        blocks_b.append(full_tensor(b0).detach().float().cpu())
        blocks_a.append(-full_tensor(ad.module.loi_A0).detach().float().cpu())
    return torch.cat(blocks_b, dim=1).contiguous(), torch.cat(blocks_a, dim=0).contiguous()


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, rank0_only: bool = True) -> Path:
    """Write a stock PEFT adapter that reproduces the model's logits on the ORIGINAL base model.

    The folder loads with ``peft.PeftModel.from_pretrained`` (and lm-eval ``peft=``, vLLM) without
    importing riemann_zero. Written atomically (temporary folder, then rename). Under
    torch.distributed every rank must call it (factors may be gathered); rank 0 writes.
    """
    from peft import LoraConfig

    out = Path(out_dir)
    adapters = find_adapters(model)
    tensors, ranks = {}, {}
    for ad in adapters:
        b, a = _export_factors(ad)
        key = f"base_model.model.{ad.name}"
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = b
        ranks[ad.name] = b.shape[1]
    if rank0_only and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return out
    src = next(iter(model.peft_config.values()))
    rank = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank
    pattern = {name: k for name, k in ranks.items() if k != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: the factors carry the scale
        target_modules=sorted(ranks),  # exact module paths: no wider match than what was trained
        lora_dropout=src.lora_dropout,
        bias="none",
        task_type=src.task_type,
        base_model_name_or_path=src.base_model_name_or_path,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
    )
    meta = {"manifold_rank": {ad.name: ad.r for ad in adapters},
            "loi": any(hasattr(ad.module, "loi_B0") for ad in adapters)}
    return write_peft_adapter(out, tensors, config, meta)


def relative_to_original(tensors: dict[str, Tensor], initial: dict[str, Tensor]
                         ) -> dict[str, Tensor]:
    """Saved LoRA factors trained from a non-zero start (B₀, A₀ in ``initial``, same keys) as
    the rank-2r factors [B | −B₀], [A ; A₀] of the same ΔW on the original base weight."""
    out = {}
    for key, value in tensors.items():
        if key not in initial:
            raise KeyError(f"{key} of the saved adapter has no initial value to subtract")
        start = initial[key].to(value.dtype)
        if ".lora_A." in key:
            out[key] = torch.cat([value, start], dim=0).contiguous()
        elif ".lora_B." in key:
            out[key] = torch.cat([value, -start], dim=1).contiguous()
        else:
            out[key] = value
    return out


def save_peft_adapter(model: nn.Module, out_dir: str | os.PathLike, *,
                      state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write a stock PEFT LoRA model's adapter (the baselines), relative to the ORIGINAL base.

    Args:
        model: a ``peft.PeftModel``; after PiSSA/LoRA-GA (:mod:`riemann_zero.adapters.inits`) its
            initial factors are subtracted as in the module docstring (rank r becomes 2r).
        out_dir: the adapter folder (replaced atomically).
        state_dict: the model's full state dict when its parameters are sharded (FSDP2);
            otherwise read from the model (wrap it in ``gathered`` under ZeRO-3). Call on one rank.
    """
    from peft import get_peft_model_state_dict

    adapter_name = getattr(model, "active_adapter", "default")
    tensors = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    initial = getattr(model, INITIAL_ATTR, None)
    if initial is not None:  # PiSSA / LoRA-GA moved the base weight
        tensors = relative_to_original(tensors, initial)
        config.r, config.lora_alpha = 2 * config.r, 2 * config.lora_alpha
        config.init_lora_weights = True
        config.lora_ga_config = None
        config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
        config.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    return write_peft_adapter(out_dir, tensors, config)
