"""PEFT's weight- and gradient-driven LoRA initialisations (PiSSA, LoRA-GA) for the baselines.

Both start from a non-zero adapter B₀A₀ and move the frozen base weight to W − s·B₀A₀, so the
model's output is unchanged at step 0 (PiSSA: top-r SVD of W; LoRA-GA: SVD of the full gradient
from a few calibration batches). An adapter trained that way only reproduces the model on the
*moved* base; :func:`save_relative_to_original` rewrites it, as PEFT's own
``path_initial_model_for_weight_conversion`` does, into a plain LoRA of rank 2r on the original
base: ΔW = s(BA − B₀A₀) = s [B | −B₀] [A ; A₀], with alpha doubled so that s is unchanged.

The initial factors are kept on the model (CPU, as saved) under :data:`INITIAL_ATTR`; every rank
builds the same ones: PiSSA is a function of W, and LoRA-GA's gradients are all-reduced over the
data-parallel ranks and its randomized SVD seeded identically (the driver seeds before building).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PEFT_INITS", "INITIAL_ATTR", "peft_init_model", "save_relative_to_original"]

PEFT_INITS = ("pissa", "lora_ga")
INITIAL_ATTR = "_rz_initial_factors"


def _lora_ga_gradients(base: nn.Module, config: Any, calibration: list[dict],
                       reduce: Callable[[Tensor], Any] | None, world: int) -> None:
    """Attach LoRA-GA's averaged full gradient to each target layer (PEFT's preprocessing)."""
    from peft import preprocess_loraga
    from peft.tuners.lora.loraga import get_target_modules

    if not calibration:
        raise ValueError("init.method=lora_ga needs calibration batches; set init.batches >= 1")

    def train_step() -> None:  # PEFT divides the summed gradient by the number of backwards
        for batch in calibration:
            base(**batch).loss.backward()

    with warnings.catch_warnings():  # PEFT's counting hooks fire on outputs only: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(base, config, train_step)
    if reduce is None:
        return
    for _, module in get_target_modules(base, config):
        grad = module._peft_loraga_grad
        total = grad.float()
        reduce(total)  # in-place sum over ranks: every rank factorises the same gradient
        module._peft_loraga_grad = (total / world).to(grad.dtype)


def peft_init_model(base: nn.Module, config: Any, method: str, *, calibration: list[dict],
                    niter: int = 0, reduce: Callable[[Tensor], Any] | None = None,
                    world: int = 1) -> nn.Module:
    """``get_peft_model`` with PiSSA or LoRA-GA initialisation; keeps B₀, A₀ for saving.

    Args:
        base: the base model (its target weights are moved by the init).
        config: a ``peft.LoraConfig``; its ``init_lora_weights`` is set here.
        method: ``"pissa"`` or ``"lora_ga"``.
        calibration: batches (with ``labels``) whose mean gradient LoRA-GA factorises.
        niter: PiSSA's randomized-SVD iterations (0 = exact SVD, PEFT's ``"pissa"``).
        reduce: in-place sum over data-parallel ranks (None for one process).
        world: number of data-parallel ranks (to turn the sum into a mean).
    """
    from peft import LoraGAConfig, get_peft_model, get_peft_model_state_dict

    if method == "pissa":
        config.init_lora_weights = f"pissa_niter_{niter}" if niter else "pissa"
    elif method == "lora_ga":
        config.init_lora_weights = "lora_ga"
        config.lora_ga_config = LoraGAConfig()  # the paper's defaults: ArB2r, stable, gamma 16
        _lora_ga_gradients(base, config, calibration, reduce, world)
    else:
        raise ValueError(f"unknown PEFT init {method!r}; choose one of {list(PEFT_INITS)}")
    model = get_peft_model(base, config)
    initial = {k: v.detach().to("cpu", copy=True)
               for k, v in get_peft_model_state_dict(model).items()}
    object.__setattr__(model, INITIAL_ATTR, initial)  # a plain attribute, not a module buffer
    return model


def save_relative_to_original(adapter_dir: str | os.PathLike, initial: dict[str, Tensor]) -> None:
    """Rewrite a saved PiSSA/LoRA-GA adapter so that it applies to the ORIGINAL base weight.

    ``adapter_dir`` holds PEFT's ``save_pretrained`` output of the trained model; ``initial`` the
    state dict recorded at initialisation. Rank r becomes 2r; the result loads with stock PEFT.
    """
    from safetensors.torch import load_file, save_file

    folder = Path(adapter_dir)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, value in weights.items():
        if key not in initial:
            raise KeyError(f"{key} of the saved adapter has no initial value to subtract")
        start = initial[key].to(value.dtype)
        if ".lora_A." in key:
            out[key] = torch.cat([value, start], dim=0).contiguous()
        elif ".lora_B." in key:
            out[key] = torch.cat([value, -start], dim=1).contiguous()
        else:
            out[key] = value
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(r=2 * cfg["r"], lora_alpha=2 * cfg["lora_alpha"], init_lora_weights=True,
               lora_ga_config=None)
    cfg["rank_pattern"] = {k: 2 * v for k, v in (cfg.get("rank_pattern") or {}).items()}
    cfg["alpha_pattern"] = {k: 2 * v for k, v in (cfg.get("alpha_pattern") or {}).items()}
    save_file(out, str(folder / "adapter_model.safetensors"))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
