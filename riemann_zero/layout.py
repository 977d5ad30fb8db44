"""The rank-2r PEFT-native block layout of a manifold adapter, and its export as a stock adapter.

Each adapter X = U Kᵀ (rank r) is stored as a standard PEFT LoRA of rank 2r and scaling 1::

    lora_B = [Z | U]   (m × 2r)        lora_A = [Vᵀ ; Kᵀ]   (2r × n)        Z = 0

so B A = Z Vᵀ + U Kᵀ = X, and one ordinary backward gives ∂L/∂Z = G V (first r columns of
lora_B.grad) and ∂L/∂K = Gᵀ U (last r rows of lora_A.grad, transposed). Target matching, dropout,
saving and loading all stay PEFT's. Adapters are found by module name, never by parameter order.

After LOI the frozen base weight is W − ΔW₀; ΔW₀ = B₀ A₀ is kept as buffers ``loi_B0``/``loi_A0``
on the LoRA layer so that the exported adapter is relative to the ORIGINAL base:
ΔW − ΔW₀ = [U | B₀] [K | −A₀ᵀ]ᵀ, again a plain LoRA.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import write_dir_atomically

__all__ = [
    "Adapter",
    "get_peft_model",
    "convert",
    "find_adapters",
    "manifold_points",
    "save_adapter",
    "set_point",
    "gathered",
]

RANK_ATTR = "_riemann_rank"


@dataclass(frozen=True)
class Adapter:
    """One manifold adapter: a PEFT LoRA layer in the rank-2r block layout."""

    name: str  # module path inside the PEFT model's ``base_model.model``
    module: nn.Module
    adapter_name: str
    r: int
    m: int  # out features
    n: int  # in features

    @property
    def lora_A(self) -> nn.Parameter:  # (2r, n): [Vᵀ ; Kᵀ]
        return self.module.lora_A[self.adapter_name].weight

    @property
    def lora_B(self) -> nn.Parameter:  # (m, 2r): [Z | U]
        return self.module.lora_B[self.adapter_name].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter_name])


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    root = model.base_model.model if hasattr(model, "base_model") else model
    for name, module in root.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A"):
            yield name, module


def _in_out(module: nn.Module) -> tuple[int, int]:
    return int(module.out_features), int(module.in_features)


def _orth(a: Tensor) -> Tensor:
    """Orthonormal basis of the columns of a (fp64 Householder QR; zero input → coordinate axes)."""
    return torch.linalg.qr(a.double())[0]


@torch.no_grad()
def set_point(ad: Adapter, u: Tensor, v: Tensor, k: Tensor) -> None:
    """Write X = U Kᵀ (V spanning range K) into the adapter's PEFT parameters, with Z = 0.

    Under an engine (ZeRO-1/2/3, FSDP2) only this rank's part is written, together with the
    engine's fp32 master copy; nothing is gathered. u, v, k are the full factors (the same on
    every rank).
    """
    from .distributed import assign, layout_of

    a, b = ad.lora_A, ad.lora_B
    if layout_of(a) != "local" or layout_of(b) != "local":
        assign(b, torch.cat([torch.zeros_like(u), u], dim=1))
        assign(a, torch.cat([v, k], dim=1).mT)
        return
    r = ad.r
    b[:, :r].zero_()
    b[:, r:].copy_(u)
    a[:r].copy_(v.mT)
    a[r:].copy_(k.mT)


def _check_rank(r: int, name: str, m: int, n: int) -> None:
    if r > min(m, n):
        raise ValueError(
            f"rank r={r} is larger than min(out, in)=min({m}, {n}) of target module {name!r}: "
            f"a rank-r "
            f"matrix of that shape does not exist. Fix: use r <= {min(m, n)} or drop this module "
            f"from target_modules."
        )


def get_peft_model(model: nn.Module, lora_config, init: str = "zero", seed: int = 0,
                   init_scale: float = 1e-3) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters in the manifold layout.

    Args:
        model: a transformers model (or any module PEFT can adapt).
        lora_config: a stock ``peft.LoraConfig`` whose ``r`` is the manifold rank r.
            ``lora_alpha`` is ignored (the layout's scaling is 1; scale enters through the lr).
        init: ``"zero"``: X = 0 with random orthonormal U and V (the paper's orthonormal-factor,
            zero-other-factor start); ``"random"``: random orthonormal U, K ~ N(0, init_scale²);
            LOI is applied afterwards with :func:`riemann_zero.loi_init`.
        seed: seed of the random bases (the same on every rank).
    """
    from peft import get_peft_model as peft_get_peft_model

    if init not in ("zero", "random"):
        raise ValueError(
            f"init must be 'zero' or 'random' (LOI: call loi_init after), but got {init!r}")
    if getattr(lora_config, "use_dora", False):
        raise ValueError("use_dora=True is not a fixed-rank adapter; set use_dora=False")
    r = int(lora_config.r)
    if r < 1:
        raise ValueError(f"r must be a positive integer, but got {r}")
    config = copy.deepcopy(lora_config)
    config.r, config.lora_alpha, config.use_rslora = 2 * r, 2 * r, False
    config.init_lora_weights = True
    peft_model = peft_get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    for ad in _mark(peft_model, r):
        u = _orth(torch.randn(ad.m, r, generator=gen, dtype=torch.float64))
        v = _orth(torch.randn(ad.n, r, generator=gen, dtype=torch.float64))
        if init == "zero":
            k = torch.zeros(ad.n, r, dtype=torch.float64)
        else:
            k = init_scale * torch.randn(ad.n, r, generator=gen, dtype=torch.float64)
            v = _orth(k)
        set_point(ad, u, v, k)
    return peft_model


def _mark(peft_model: nn.Module, r: int | None) -> list[Adapter]:
    """Set the manifold rank on every LoRA layer (r=None: half the PEFT rank) and check it fits."""
    found = []
    for name, module in _lora_layers(peft_model):
        for adapter_name in module.lora_A:
            rank = r if r is not None else int(module.r[adapter_name]) // 2
            m, n = _in_out(module)
            _check_rank(rank, name, m, n)
            if int(module.r[adapter_name]) != 2 * rank:
                raise ValueError(
                    f"{name}: PEFT rank {module.r[adapter_name]} is not 2r = {2 * rank}")
            module.scaling[adapter_name] = 1.0
            setattr(module, RANK_ATTR, rank)
            found.append(Adapter(name, module, adapter_name, rank, m, n))
    if not found:
        raise ValueError("no LoRA layers found: wrap the model with PEFT (target_modules) first")
    return found


@torch.no_grad()
def convert(peft_model: nn.Module) -> list[Adapter]:
    """Convert a stock PEFT LoRA model (rank r, any scaling) in place to the manifold layout.

    X = s·B·A is kept exactly: B = Q_B R_B, Aᵀ = Q_A R_A, SVD of s·R_B R_Aᵀ = W Σ Zᵀ gives
    U = Q_B W, V = Q_A Z, K = V Σ. The LoRA modules are replaced by rank-2r ones and the config
    updated, so saving/loading stays PEFT's.
    """
    converted = []
    for name, module in _lora_layers(peft_model):
        if hasattr(module, RANK_ATTR):
            raise ValueError(f"{name} is already in the manifold layout")
        for adapter_name in list(module.lora_A):
            a_old = module.lora_A[adapter_name].weight
            b_old = module.lora_B[adapter_name].weight
            r = a_old.shape[0]
            m, n = _in_out(module)
            _check_rank(r, name, m, n)
            s = float(module.scaling[adapter_name])
            qb, rb = torch.linalg.qr(b_old.double())
            qa, ra = torch.linalg.qr(a_old.double().mT)
            w, sigma, zt = torch.linalg.svd(s * rb @ ra.mT)
            u, v = qb @ w, qa @ zt.mT
            k = v * sigma
            dtype, device = a_old.dtype, a_old.device
            kw = dict(bias=False, dtype=dtype, device=device)
            module.lora_A[adapter_name] = nn.Linear(n, 2 * r, **kw)
            module.lora_B[adapter_name] = nn.Linear(2 * r, m, **kw)
            module.r[adapter_name] = 2 * r
            module.lora_alpha[adapter_name] = 2 * r
            module.scaling[adapter_name] = 1.0
            setattr(module, RANK_ATTR, r)
            ad = Adapter(name, module, adapter_name, r, m, n)
            set_point(ad, u, v, k)
            converted.append(ad)
    if not converted:
        raise ValueError("no LoRA layers found: wrap the model with peft.get_peft_model first")
    for cfg in peft_model.peft_config.values():
        cfg.r, cfg.lora_alpha, cfg.use_rslora = 2 * cfg.r, 2 * cfg.r, False
    return converted


def find_adapters(model: nn.Module) -> list[Adapter]:
    """All manifold adapters of a PEFT model, in module order (active adapters only)."""
    found = []
    for name, module in _lora_layers(model):
        rank = getattr(module, RANK_ATTR, None)
        if rank is None:
            continue
        for adapter_name in module.active_adapters:
            if adapter_name in module.lora_A:
                m, n = _in_out(module)
                found.append(Adapter(name, module, adapter_name, rank, m, n))
    if not found:
        raise ValueError(
            "no manifold adapters in this model: build it with riemann_zero.get_peft_model(...) or "
            "convert a PEFT LoRA model with riemann_zero.convert(...)"
        )
    return found


@contextlib.contextmanager
def gathered(params: list[Tensor], modify: bool = False):
    """Make full parameters visible inside the block under ZeRO-3 (a no-op elsewhere).

    With ``modify=True`` the values written inside the block are re-partitioned on exit (rank 0's
    values win) and copied into the engine's fp32 master partitions, if any. FSDP2 parameters stay
    sharded: write them with :func:`set_point` (which handles DTensors).
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    else:
        yield
    if modify:  # an engine's fp32 master copies (ZeRO-1/2/3) must see the new values too
        from .distributed import refresh_master

        for p in params:
            refresh_master(p)


def _full(p: Tensor) -> Tensor:
    """The whole tensor of a parameter (FSDP2 DTensor → full_tensor(); others as they are)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def manifold_points(model: nn.Module) -> dict[str, Tensor]:
    """For every adapted module, the current point X (m×n, rank r) that the optimizer moves.

    The module's effective weight is its (possibly LOI-shifted) base weight plus X.
    """
    points = {}
    for ad in find_adapters(model):
        with gathered([ad.lora_A, ad.lora_B]):
            b, a = _full(ad.lora_B).detach(), _full(ad.lora_A).detach()
            dtype = torch.promote_types(b.dtype, torch.float32)  # fp64 stays fp64
            points[ad.name] = ad.scaling * (b.to(dtype) @ a.to(dtype))
    return points


def _export_factors(ad: Adapter) -> tuple[Tensor, Tensor]:
    """(B, A) of a plain LoRA equal to this adapter's ΔW relative to the original base weight."""
    with gathered([ad.lora_A, ad.lora_B]):
        b = _full(ad.lora_B).detach().float().cpu() * ad.scaling
        a = _full(ad.lora_A).detach().float().cpu()
    r = ad.r
    blocks_b, blocks_a = [b[:, r:]], [a[r:]]
    if b[:, :r].abs().max() > 0:  # Z ≠ 0 only if something other than our optimizer stepped it
        blocks_b.append(b[:, :r])
        blocks_a.append(a[:r])
    b0 = getattr(ad.module, "loi_B0", None)
    if b0 is not None:
        blocks_b.append(_full(b0).detach().float().cpu())
        blocks_a.append(-_full(ad.module.loi_A0).detach().float().cpu())
    return torch.cat(blocks_b, dim=1).contiguous(), torch.cat(blocks_a, dim=0).contiguous()


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, rank0_only: bool = True) -> Path:
    """Write a stock PEFT adapter that reproduces the model's logits on the ORIGINAL base model.

    The folder loads with ``peft.PeftModel.from_pretrained`` (and lm-eval ``peft=``, vLLM) without
    importing riemann_zero. Written atomically (temporary folder, then rename). Under
    torch.distributed every rank must call it (factors may be gathered); rank 0 writes.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

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
    def build(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        config.save_pretrained(str(tmp))
        (tmp / "riemann_zero.json").write_text(json.dumps(
            {"manifold_rank": {ad.name: ad.r for ad in adapters},
             "loi": any(hasattr(ad.module, "loi_B0") for ad in adapters)}, indent=1))

    return write_dir_atomically(out, build)
