"""Merging stock PEFT adapters of one base model (docs/design.md §9), without training.

LoRA sources (points Xᵢ = sᵢ Bᵢ Aᵢ on M_r; any rank, ``lora_alpha``, rsLoRA, rank/alpha patterns,
different target sets: a module absent from a source contributes 0), weights wᵢ:

- ``cat``: exactly Σ wᵢ Xᵢ, factors [w₁s₁B₁ …], [A₁; …] (rank Σ rᵢ, zero-padded to one rank);
- ``fixed_rank``: the best rank-R approximation of Σ wᵢ Xᵢ (R = ``rank``, default max rᵢ) from
  the stacked factors (:func:`riemann_zero.manifold.fixed_rank.truncated_sum`; never m×n), so it
  depends on the ΔWᵢ only, not on how each is factored;
- ``peft:<type>``: PEFT's own ``add_weighted_adapter`` (``linear``, ``svd``, ``ties_svd``, …),
  run by PEFT itself on the loaded base model, for comparison.

``restore="spectra"`` for LoRA (this project's analogue of OrthoFuse's restoration): averaging
shrinks singular values when the terms point in different directions (‖½X₁ + ½X₂‖ = ‖X‖/√2 for
orthogonal X₁, X₂ of equal norm). Per layer, the merged singular values are multiplied by
c = Σ|wᵢ|‖Xᵢ‖_F / ‖Σ wᵢXᵢ‖_F (≥ 1; 1 for parallel terms and for a module only one source has),
so that the merged update is as large as the weighted sizes of its terms.

Orthogonal sources (PEFT OFT, either Cayley convention, and BOFT, factor by factor, block by
block; :mod:`riemann_zero.manifold.orthogonal`), position ``t`` from the first (0) to the second
(1): ``geodesic`` (R₁ exp(t log R₁ᵀR₂)) and ``orthofuse`` (Cayley-space interpolation), with
``restore="spectra"`` (OrthoFuse's η(t)) or ``"none"``. Rotations are written in PEFT's exact
Cayley form (``use_cayley_neumann=False``); BOFT's output scales ``boft_s`` are interpolated
linearly, (1 − t)s₁ + t s₂. A module one source lacks counts as the identity rotation there.

The output is a stock PEFT adapter folder, written atomically, plus ``merge.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from riemann_zero.adapters.export import write_peft_adapter
from riemann_zero.io import versions
from riemann_zero.manifold import orthogonal as orth
from riemann_zero.manifold.fixed_rank import truncated_sum

__all__ = ["MergeError", "LORA_METHODS", "ORTHOGONAL_METHODS", "PEFT_TYPES", "RESTORE",
           "METHODS", "read_adapter", "merge_adapters", "lora_merge_tensors",
           "orthogonal_merge_tensors"]

LORA_METHODS = ("cat", "fixed_rank")
ORTHOGONAL_METHODS = ("geodesic", "orthofuse")
# PEFT's add_weighted_adapter combination types (peft 0.21).
PEFT_TYPES = ("linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties",
              "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
METHODS = (*LORA_METHODS, *ORTHOGONAL_METHODS, *(f"peft:{k}" for k in PEFT_TYPES))
RESTORE = ("none", "spectra")
PEFT_DENSITY = 0.5  # density of PEFT's ties/dare/magnitude_prune types (their own default is None)
_PEFT_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_PREFIX = "base_model.model."
_SUPPORTED = ("LORA", "OFT", "BOFT")


class MergeError(ValueError):
    """A bad merge request; the message is one line naming the problem and the fix."""


@dataclass
class AdapterFiles:
    """One stock PEFT adapter folder as read from disk."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor] = field(repr=False)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read_adapter(path: str | os.PathLike) -> AdapterFiles:
    """``adapter_config.json`` and ``adapter_model.safetensors`` of an adapter folder.

    Raises:
        MergeError: the folder or one of its two files is missing.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise MergeError(f"{str(path)!r} is not a PEFT adapter folder (needs adapter_config.json "
                         f"and adapter_model.safetensors); pass the folder save_pretrained wrote")
    return AdapterFiles(path, json.loads(cfg.read_text()), load_file(str(weights)))


# ------------------------------------------------------------------------------ validation
def _check(sources: list[AdapterFiles], out: Path, method: str, weights: list[float] | None,
           rank: int | None, t: float | None, restore: str | None) -> None:
    if method not in METHODS:
        import difflib

        hint = difflib.get_close_matches(method, METHODS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise MergeError(f"--method must be one of {list(METHODS)}, but got {method!r}{extra}")
    if len(sources) < 2:
        raise MergeError(f"merging needs at least two source adapters, but got {len(sources)}")
    types = {s.peft_type for s in sources}
    if len(types) > 1:
        raise MergeError(f"the sources are adapters of different types "
                         f"({', '.join(f'{s.path}: {s.peft_type}' for s in sources)}); "
                         f"merge adapters of one type only")
    kind = types.pop()
    if kind not in _SUPPORTED:
        raise MergeError(f"{kind} adapters cannot be merged here; supported types: "
                         f"{list(_SUPPORTED)}")
    bases = {s.base for s in sources}
    if len(bases) > 1:
        shown = ", ".join(f"{s.path}: {s.base}" for s in sources)
        raise MergeError(f"the sources were trained on different base models ({shown}); merge "
                         f"adapters of one base model only")
    orthogonal = method in ORTHOGONAL_METHODS
    if orthogonal and kind == "LORA":
        raise MergeError(f"--method {method} merges orthogonal (OFT/BOFT) adapters, but the "
                         f"sources are LoRA; use --method fixed_rank (or cat, peft:svd, ...)")
    if not orthogonal and kind != "LORA":
        raise MergeError(f"--method {method} merges LoRA adapters, but the sources are {kind}; "
                         f"use --method geodesic or orthofuse")
    if t is not None and not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise MergeError(f"--t must be in [0, 1] (0: the first source, 1: the second), but got {t}")
    if rank is not None and rank <= 0:
        raise MergeError(f"--rank must be a positive integer, but got {rank}")
    if restore is not None and restore not in RESTORE:
        raise MergeError(f"--restore must be one of {list(RESTORE)}, but got {restore!r}")
    if weights is not None and len(weights) != len(sources):
        raise MergeError(f"--weights has {len(weights)} values for {len(sources)} sources; give "
                         f"one weight per source")
    if weights is not None and t is not None:
        raise MergeError("--weights and --t both set the mixture; give only one of them")
    if t is not None and len(sources) != 2:
        raise MergeError(f"--t is the position between two sources, but got {len(sources)}; "
                         f"use --weights for more")
    if orthogonal:
        if len(sources) != 2:
            raise MergeError(f"--method {method} merges exactly two adapters, but got "
                             f"{len(sources)}; merge them pairwise")
        if weights is not None:
            raise MergeError(f"--method {method} takes --t (position from the first source to "
                             f"the second), not --weights")
    if method.startswith("peft:"):
        if restore == "spectra":
            raise MergeError("--restore spectra applies to cat, fixed_rank, geodesic and "
                             "orthofuse, not to PEFT's own types; drop --restore")
        if method[5:] in _PEFT_SAME_RANK:
            ranks = {_max_rank(s.config) for s in sources}
            if len(ranks) > 1:
                raise MergeError(f"--method {method} needs sources of one rank, but got ranks "
                                 f"{sorted(ranks)}; use --method fixed_rank or peft:svd")
    if method == "cat" and rank is not None:
        raise MergeError("--method cat keeps every direction (rank = Σ rᵢ); drop --rank or use "
                         "--method fixed_rank")
    for s in sources:
        if s.config.get("use_dora"):
            raise MergeError(f"{s.path} is a DoRA adapter (use_dora); its magnitude vector does "
                             f"not merge additively; merge plain LoRA adapters")
    _check_out(out, sources)


def _check_out(out: Path, sources: list[AdapterFiles]) -> None:
    if any(out.resolve() == s.path.resolve() for s in sources):
        raise MergeError(f"--out {str(out)!r} is one of the sources; choose a new folder")
    if out.exists():
        if not out.is_dir():
            raise MergeError(f"--out {str(out)!r} is a file; choose a folder that does not exist")
        if any(out.iterdir()) and not (out / "merge.json").is_file():
            raise MergeError(f"--out {str(out)!r} already holds something other than a merge "
                             f"output; choose a new folder or delete it")


def _max_rank(config: dict[str, Any]) -> int:
    pattern = config.get("rank_pattern") or {}
    return max([int(config.get("r", 0)), *map(int, pattern.values())])


# ------------------------------------------------------------------------------ LoRA
def _pattern(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rank/alpha pattern lookup (peft.utils.other.get_pattern_key) for one module."""
    import re

    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return None


def _lora_terms(src: AdapterFiles) -> dict[str, tuple[float, Tensor, Tensor]]:
    """{module: (scaling, B (m×r), A (r×n))} of a LoRA adapter, in float64."""
    cfg = src.config
    out = {}
    for key, a in src.tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = src.tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise MergeError(f"{src.path}: {key} has no lora_B partner; the adapter file is "
                             f"damaged, save it again")
        name = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        r = a.shape[0]
        alpha = _pattern(cfg.get("alpha_pattern") or {}, name)
        alpha = float(cfg.get("lora_alpha", r) if alpha is None else alpha)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[module] = (scale, b.double(), a.double())
    if not out:
        raise MergeError(f"{src.path} holds no lora_A/lora_B tensors; is it a LoRA adapter?")
    return out


def lora_merge_tensors(sources: list[dict[str, tuple[float, Tensor, Tensor]]],
                       weights: list[float], method: str, rank: int | None,
                       restore: bool) -> tuple[dict[str, tuple[Tensor, Tensor]], int, dict]:
    """The merged factors {module: (B, A)} (scaling 1, one rank for all modules), that rank,
    and statistics. Modules of one shape are merged in one batched call."""
    modules = sorted(set().union(*sources))
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    stacked: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for name in modules:
        lefts, rights, sizes = [], [], []
        for w, terms in zip(weights, sources):
            if name in terms:
                s, b, a = terms[name]
                lefts.append((w * s) * b)
                rights.append(a.mT)
                # ‖w s B A‖_F from r×r Grams: |w s|·sqrt(tr((BᵀB)(AAᵀ)))
                sizes.append(abs(w * s) * torch.sum((b.mT @ b) * (a @ a.mT)).clamp_min(0).sqrt())
        left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=1)
        stacked[name] = (left, right, sum(sizes))
        groups[(left.shape[0], right.shape[0])].append(name)
    out_rank = (max(v[0].shape[1] for v in stacked.values()) if method == "cat"
                else rank or max(max(b.shape[1] for _, b, _ in t.values()) for t in sources))
    result, factors, kept = {}, [], []
    for names in groups.values():
        k = max(stacked[x][0].shape[1] for x in names)
        left = torch.stack([_pad_cols(stacked[x][0], k) for x in names])
        right = torch.stack([_pad_cols(stacked[x][1], k) for x in names])
        sizes = torch.stack([torch.as_tensor(stacked[x][2], dtype=torch.float64) for x in names])
        tr = truncated_sum(left, right, out_rank if method == "fixed_rank" else k)
        c = (sizes / tr.norm.clamp_min(1e-300)).clamp_min(1.0) if restore else None
        if method == "cat":
            b_out, a_out = left, right.mT
            if c is not None:
                b_out = b_out * c.view(-1, 1, 1)
            b_out = torch.nn.functional.pad(b_out, (0, out_rank - k))
            a_out = torch.nn.functional.pad(a_out, (0, 0, 0, out_rank - k))
        else:
            s = tr.s * (c.view(-1, 1) if c is not None else 1.0)
            root = s.sqrt()
            b_out = tr.U * root.unsqueeze(-2)
            a_out = (tr.V * root.unsqueeze(-2)).mT
            energy = (tr.s.square().sum(-1) / tr.norm.square().clamp_min(1e-300))
            kept += energy.tolist()
        if c is not None:
            factors += c.tolist()
        for i, name in enumerate(names):
            result[name] = (b_out[i], a_out[i])
    stats = {"modules": len(result)}
    if kept:
        stats["kept_energy"] = {"min": min(kept), "mean": sum(kept) / len(kept)}
    if factors:
        stats["restore_factor"] = {"min": min(factors), "mean": sum(factors) / len(factors),
                                   "max": max(factors)}
    return result, out_rank, stats


def _pad_cols(x: Tensor, k: int) -> Tensor:
    """``x`` with zero columns appended up to ``k`` columns (a zero term changes no sum)."""
    return torch.nn.functional.pad(x, (0, k - x.shape[-1]))


def _lora_output(sources: list[AdapterFiles], method: str, weights: list[float],
                 rank: int | None, restore: bool) -> tuple[dict[str, Tensor], Any, dict]:
    from peft import LoraConfig

    merged, out_rank, stats = lora_merge_tensors([_lora_terms(s) for s in sources], weights,
                                                 method, rank, restore)
    dtype = next(iter(sources[0].tensors.values())).dtype
    tensors = {}
    for module, (b, a) in merged.items():
        tensors[f"{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{module}.lora_B.weight"] = b.to(dtype).contiguous()
    cfg = dict(sources[0].config)
    cfg.update(r=out_rank, lora_alpha=out_rank, use_rslora=False, rank_pattern={},
               alpha_pattern={}, target_modules=_leaf_targets(merged), layers_to_transform=None,
               layers_pattern=None, init_lora_weights=True, inference_mode=True)
    return tensors, _config(LoraConfig, cfg), stats


def _leaf_targets(modules: Any) -> list[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def _config(cls: Any, data: dict[str, Any]) -> Any:
    """A PEFT config from a saved dict, keeping only the fields this PEFT version knows."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k in known and k != "peft_type"}
    return cls(**data)


# ------------------------------------------------------------------------------ OFT / BOFT
def _rotations(src: AdapterFiles) -> dict[str, Tensor]:
    """{module: exact-form generators (blocks, b, b)} of an OFT or BOFT adapter, float64."""
    out = {}
    if src.peft_type == "OFT":
        neumann = bool(src.config.get("use_cayley_neumann", False))
        for key, vec in src.tensors.items():
            if key.endswith(".oft_R.weight"):
                out[key[: -len(".oft_R.weight")]] = orth.generator(vec.double(), neumann=neumann)
    else:
        for key, x in src.tensors.items():
            if key.endswith(".boft_R"):
                x = x.double()
                out[key[: -len(".boft_R")]] = 0.5 * (x - x.mT)  # BOFT's own skew part
    if not out:
        raise MergeError(f"{src.path} holds no oft_R/boft_R tensors; is it an OFT/BOFT adapter?")
    return out


def orthogonal_merge_tensors(s1: dict[str, Tensor], s2: dict[str, Tensor], method: str,
                             t: float, restore: bool) -> dict[str, Tensor]:
    """Merged exact-form generators {module: S (…, b, b)}; modules of one block shape are merged
    in one batched call. A module absent from one side is the identity (S = 0) there."""
    modules = sorted(set(s1) | set(s2))
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name in modules:
        a, b = s1.get(name), s2.get(name)
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        if a.shape != b.shape:
            raise MergeError(f"{name}: the sources' rotation blocks differ in shape "
                             f"({tuple(a.shape)} vs {tuple(b.shape)}); merge adapters trained with "
                             f"the same block size and number of blocks")
        s1[name], s2[name] = a, b
        groups[tuple(a.shape)].append(name)
    factor = orth.restore_factor(t) if restore else 1.0
    out = {}
    for names in groups.values():
        a = torch.stack([s1[x] for x in names])
        b = torch.stack([s2[x] for x in names])
        if method == "geodesic":
            s = orth.cayley_inverse(orth.geodesic(orth.cayley(a), orth.cayley(b), t))
        else:  # orthofuse: the interpolated generator itself, cayley((1 − t)S₁ + t S₂)
            s = (1 - t) * a + t * b
        s = factor * s
        for i, name in enumerate(names):
            out[name] = s[i]
    return out


def _orthogonal_output(sources: list[AdapterFiles], method: str, t: float,
                       restore: bool) -> tuple[dict[str, Tensor], Any, dict]:
    from peft import BOFTConfig, OFTConfig

    merged = orthogonal_merge_tensors(_rotations(sources[0]), _rotations(sources[1]), method, t,
                                      restore)
    dtype = next(iter(sources[0].tensors.values())).dtype
    cfg = dict(sources[0].config)
    cfg.update(target_modules=_leaf_targets(merged), inference_mode=True)
    tensors = {}
    if sources[0].peft_type == "OFT":
        for module, s in merged.items():
            tensors[f"{module}.oft_R.weight"] = orth.unskew(s).to(dtype).contiguous()
        cfg.update(use_cayley_neumann=False)
        return tensors, _config(OFTConfig, cfg), {"modules": len(merged)}
    for module, s in merged.items():
        tensors[f"{module}.boft_R"] = s.to(dtype).contiguous()
        scales = [src.tensors.get(f"{module}.boft_s") for src in sources]
        ones = next(x for x in scales if x is not None)
        s1, s2 = (torch.ones_like(ones) if x is None else x for x in scales)
        tensors[f"{module}.boft_s"] = ((1 - t) * s1.double() + t * s2.double()).to(dtype)
    return tensors, _config(BOFTConfig, cfg), {"modules": len(merged)}


# ------------------------------------------------------------------------------ PEFT's types
def _peft_output(sources: list[AdapterFiles], kind: str, weights: list[float],
                 rank: int | None) -> tuple[dict[str, Tensor], Any, dict]:
    """PEFT's add_weighted_adapter on the loaded base model (what PEFT users run)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    dtype = next(iter(sources[0].tensors.values())).dtype  # PEFT computes in the base's dtype
    base = AutoModelForCausalLM.from_pretrained(sources[0].base, dtype=dtype)
    names = [f"source{i}" for i in range(len(sources))]
    model = PeftModel.from_pretrained(base, str(sources[0].path), adapter_name=names[0])
    for name, src in zip(names[1:], sources[1:]):
        model.load_adapter(str(src.path), adapter_name=name)
    extra = {"density": PEFT_DENSITY} if kind not in ("linear", "svd", "cat") else {}
    with torch.random.fork_rng():  # the dare_* types drop entries at random: fixed seed
        torch.manual_seed(0)
        model.add_weighted_adapter(names, list(weights), "merged", combination_type=kind,
                                   svd_rank=rank, **extra)
    tensors = get_peft_model_state_dict(model, adapter_name="merged")
    config = model.peft_config["merged"]
    config.inference_mode = True
    return tensors, config, {"peft_combination_type": kind, **extra}


# ------------------------------------------------------------------------------ entry point
def merge_adapters(sources: list[str | os.PathLike], out: str | os.PathLike, *, method: str,
                   weights: list[float] | None = None, rank: int | None = None,
                   t: float | None = None, restore: str | None = None) -> Path:
    """Merge stock PEFT adapters of one base model into a new stock PEFT adapter folder.

    Args:
        sources: adapter folders (LoRA, or two OFT/BOFT adapters).
        out: the output folder (written atomically; an earlier merge output there is replaced).
        method: ``cat``, ``fixed_rank``, ``geodesic``, ``orthofuse`` or ``peft:<type>``.
        weights: LoRA mixture weights, one per source (default: equal, 1/k each).
        rank: output rank of ``fixed_rank`` and PEFT's svd types (default: max rᵢ).
        t: position from the first source (0) to the second (1); default ½. For LoRA it stands
            for the weights (1 − t, t).
        restore: ``"none"`` (default) or ``"spectra"`` (see the module docstring).

    Returns:
        The output folder, which also holds ``merge.json`` (sources, method, settings, stats).

    Raises:
        MergeError: a bad request (one line naming the fix), before any work starts.
    """
    out = Path(out)
    loaded = [read_adapter(s) for s in sources]
    _check(loaded, out, method, weights, rank, t, restore)
    do_restore = restore == "spectra"
    if method in ORTHOGONAL_METHODS:
        t = 0.5 if t is None else float(t)
        tensors, config, stats = _orthogonal_output(loaded, method, t, do_restore)
        mix: list[float] | None = None
    else:
        mix = ([1 - t, t] if t is not None else
               [float(w) for w in weights] if weights is not None else
               [1.0 / len(loaded)] * len(loaded))
        if method.startswith("peft:"):
            tensors, config, stats = _peft_output(loaded, method[5:], mix, rank)
        else:
            tensors, config, stats = _lora_output(loaded, method, mix, rank, do_restore)
    record = {"method": method, "sources": [str(s.path.resolve()) for s in loaded],
              "base_model": loaded[0].base, "adapter_type": loaded[0].peft_type,
              "weights": mix, "rank": getattr(config, "r", None) if loaded[0].peft_type == "LORA"
              else None, "t": t,
              "restore": restore or "none", "stats": stats,
              "versions": versions(("torch", "peft", "transformers", "riemann-zero"))}
    return write_peft_adapter(out, tensors, config, files={"merge.json": record})
