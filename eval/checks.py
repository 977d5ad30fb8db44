"""Input checks that run before any model is loaded: run directory, adapter, base model, suite."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riemann_zero import assets

__all__ = ["Target", "resolve", "check_compatible", "adapter_label"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What to evaluate: a stock PEFT adapter, its base model and (if known) its recipe."""

    adapter: Path
    base: str
    recipe: dict[str, Any] | None
    run_dir: Path


def _adapter_dir(path: Path) -> Path:
    if (path / "adapter_config.json").exists():
        return path
    if (path / "adapter" / "adapter_config.json").exists():
        return path / "adapter"
    raise ValueError(
        f"no PEFT adapter in {path}: expected {path}/adapter/adapter_config.json (a training "
        f"output_dir) or {path}/adapter_config.json (an adapter folder)"
        + ("" if path.exists() else "; the path does not exist")
    )


def _recipe(adapter: Path) -> dict[str, Any] | None:
    for candidate in (adapter.parent / "run.json", adapter / "run.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return None


def resolve(path: str | os.PathLike, base: str | None = None) -> Target:
    """Find the adapter, base model and recipe of a run directory or adapter folder.

    Args:
        path: a training ``output_dir`` (with ``adapter/`` and ``run.json``) or an adapter folder.
        base: base model to use instead of the adapter's ``base_model_name_or_path``.

    Raises:
        ValueError: no adapter there, or no usable base model (the message says which to pass).
    """
    path = Path(path).expanduser().resolve()
    adapter = _adapter_dir(path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    named = config.get("base_model_name_or_path")
    recipe = _recipe(adapter)
    chosen = base or (assets.resolve_name(named) if named else None)
    if not chosen:
        raise ValueError(f"{adapter}/adapter_config.json names no base_model_name_or_path; "
                         f"pass --base PATH")
    if base is None and not Path(chosen).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"the adapter's base model {chosen!r} is not a local directory and the "
                         f"Hub is offline; pass --base PATH_TO_THAT_MODEL")
    return Target(adapter=adapter, base=str(chosen), recipe=recipe, run_dir=path)


def _adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    file = adapter / "adapter_model.safetensors"
    if not file.exists():
        raise ValueError(f"{adapter} has adapter_config.json but no adapter_model.safetensors")
    with safe_open(str(file), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118


def check_compatible(adapter: Path, base: str) -> None:
    """Fail clearly if the adapter's LoRA factors do not fit the base model's layers.

    Builds the base model on the meta device (no weights read) and checks, for every
    ``...<module>.lora_A/B.weight``, that the module exists and that A is (r, in_features) and
    B is (out_features, r). A different base name with matching shapes only logs a warning.

    Raises:
        ValueError: a target module is missing or has another shape.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((adapter / "adapter_config.json").read_text())
    named = config.get("base_model_name_or_path")
    named = assets.resolve_name(named) if named else named
    if named and Path(str(named)).resolve() != Path(base).resolve() and named != base:
        log.warning("adapter %s names base %s but %s is used", adapter, named, base)
    try:
        base_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the base model config at {base!r}: {err}; pass --base "
                         f"with a local model directory") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config)
    modules = dict(model.named_modules())
    problems = []
    for key, shape in _adapter_shapes(adapter).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        kind = "A" if ".lora_A." in key else "B"
        name = key.split(f".lora_{kind}.")[0].removeprefix("base_model.model.")
        module = modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            problems.append(f"{name}: no such linear layer in the base model")
            continue
        want = module.in_features if kind == "A" else module.out_features
        got = shape[1] if kind == "A" else shape[0]
        if got != want:
            side = "in" if kind == "A" else "out"
            problems.append(f"{name}.lora_{kind}: {side}_features {got} in the adapter, "
                            f"{want} in the base model")
    if problems:
        shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)"
                                             if len(problems) > 5 else "")
        raise ValueError(
            f"adapter {adapter} does not fit base model {base} "
            f"({base_config.model_type}, hidden {getattr(base_config, 'hidden_size', '?')}): "
            f"{shown}. Pass --base with the model it was trained on "
            f"(adapter_config.json says {named!r})")


def adapter_label(adapter: Path) -> str:
    """A short, readable name for an adapter: its run directory's name, else its own."""
    return adapter.parent.name if adapter.name == "adapter" else adapter.name
