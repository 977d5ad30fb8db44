"""StelLA baseline (arXiv 2510.01938, NeurIPS 2025): LoRA as ΔW = s·U S Vᵀ with U, V on Stiefel.

The adapters stay STOCK PEFT LoRA modules of rank r (PEFT's scaling s = lora_alpha / r, as in
the reference, whose layer computes ``U(S(Vᵀ x)) * scaling``)::

    lora_B = U        (m × r, orthonormal columns)
    lora_A = S Vᵀ     (r × n, V orthonormal, S free r × r or diagonal)

so saving, loading and lm-eval stay PEFT's. One ordinary backward gives ∂L/∂B = s G V Sᵀ (the
Euclidean gradient of U) and ∂L/∂A = s Uᵀ G, hence ∇S = (∂L/∂A) V and ∇V = (∂L/∂A)ᵀ S. The
optimizer keeps U, S, V (fp32 or fp64 masters) in its state and rewrites B, A after each step.

Reference code read: ``SonyResearch/stella`` at fa5d066 (files cited as ``path:line``):
``stella/tuner/model.py:473-540`` (pre/post optimizer-step hooks), ``stella/tuner/stiefel.py``
(projections, polar retraction), ``stella/tuner/layer.py:113-202`` (initialisations),
``stella/tuner/config.py:100-149`` (defaults), ``stella/trainer/stella_trainer.py`` (hooks around
the HF AdamW step, U and Vᵀ excluded from weight decay), ``experiments/commonsense/
llama3_8b_stella.sh`` (recipe: r 32, α 64, lr 5e-4, wd 0, polar, AdamW, init "rando",
``--stella_diag_s True``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checkpoint import keep_state_dtypes
from .layout import _lora_layers

__all__ = ["INITS", "StelLA", "stella_init"]

# Initialisations of the reference (layer.py:149-202) plus the zero-S ablation (paper Table 5).
# "rando" (their default, config.py:141-149 and the recipe's INIT): Haar-orthonormal U, V, S = I.
INITS = ("rando", "zero_s", "svd_major", "svd_minor")
FACTORS_ATTR = "_stella_factors"  # {adapter_name: (U, S, V)} written by stella_init


@dataclass(frozen=True)
class _Slot:
    """One adapter: a PEFT LoRA layer and the name of its adapter."""

    name: str
    module: nn.Module
    adapter_name: str
    m: int  # out features
    n: int  # in features
    r: int

    @property
    def B(self) -> nn.Parameter:  # noqa: N802  (m, r) = U
        return self.module.lora_B[self.adapter_name].weight

    @property
    def A(self) -> nn.Parameter:  # noqa: N802  (r, n) = S Vᵀ
        return self.module.lora_A[self.adapter_name].weight


def _slots(model: nn.Module) -> list[_Slot]:
    found = []
    for name, module in _lora_layers(model):
        for adapter_name in module.active_adapters:
            if adapter_name not in module.lora_A:
                continue
            if module.use_dora.get(adapter_name, False):
                raise ValueError(f"{name}: StelLA needs plain LoRA, but got use_dora=True")
            if getattr(module, "fan_in_fan_out", False):
                raise ValueError(
                    f"{name}: StelLA supports nn.Linear targets, but got fan_in_fan_out=True")
            m, n = int(module.out_features), int(module.in_features)
            found.append(_Slot(name, module, adapter_name, m, n, int(module.r[adapter_name])))
    if not found:
        raise ValueError("no LoRA layers found, but got a model without adapters: wrap it with "
                         "peft.get_peft_model(model, LoraConfig(target_modules=...)) first")
    return found


def _haar(rows: int, r: int, gen: torch.Generator) -> Tensor:
    """Haar-random rows×r orthonormal columns (what nn.init.orthogonal_ draws, layer.py:170)."""
    q, rr = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, 1.0)


def _s_vt(s: Tensor, v: Tensor, diag: bool) -> Tensor:
    """A = S Vᵀ (batched); diagonal S stored as a vector."""
    return s.unsqueeze(-1) * v.mT if diag else s @ v.mT


@torch.no_grad()
def stella_init(peft_model: nn.Module, seed: int = 0, init: str = "rando",
                diag_s: bool = False) -> int:
    """Initialise every LoRA adapter of ``peft_model`` as U S Vᵀ (B = U, A = S Vᵀ) in place.

    Args:
        peft_model: a model wrapped with stock ``peft.get_peft_model`` (LoRA, any lora_alpha).
        seed: seed of the random orthonormal bases (the same seed gives the same adapters).
        init: ``"rando"`` (reference default, layer.py:169-175: Haar-orthonormal U and V, S = I;
            the model output CHANGES by s·U Vᵀ, as in the reference); ``"zero_s"`` (same bases,
            S = 0: the output is unchanged at step 0); ``"svd_major"``/``"svd_minor"`` (U, V = the
            top/bottom r singular vectors of the base weight, S = I; layer.py:177-202).
        diag_s: S diagonal (the published recipe's ``--stella_diag_s True``) instead of a free
            r×r matrix (the config default, config.py:104-107).

    Returns:
        The number of adapters initialised.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, but got {init!r}")
    gen = torch.Generator().manual_seed(int(seed))
    slots = _slots(peft_model)
    for sl in slots:
        if sl.r > min(sl.m, sl.n):
            raise ValueError(
                f"{sl.name}: rank r must be <= min(out, in) = {min(sl.m, sl.n)} for orthonormal "
                f"U and V, but got r={sl.r}; lower r or drop this module from target_modules")
        if init.startswith("svd"):
            w = sl.module.get_base_layer().weight.detach().to("cpu", torch.float64)
            left, _, right_t = torch.linalg.svd(w, full_matrices=False)
            cols = slice(0, sl.r) if init == "svd_major" else slice(-sl.r, None)
            u, v = left[:, cols], right_t[cols].mT
        else:
            u, v = _haar(sl.m, sl.r, gen), _haar(sl.n, sl.r, gen)
        fill = 0.0 if init == "zero_s" else 1.0
        s = torch.full((sl.r,), fill, dtype=torch.float64)
        if not diag_s:
            s = torch.diag(s)
        b, a = sl.B, sl.A
        master = torch.promote_types(b.dtype, torch.float32)
        u, s, v = (t.to(device=b.device, dtype=master).contiguous() for t in (u, s, v))
        b.copy_(u)
        a.copy_(_s_vt(s, v, diag_s))
        factors = getattr(sl.module, FACTORS_ATTR, None)
        if factors is None:
            factors = {}
            setattr(sl.module, FACTORS_ATTR, factors)  # plain attribute: not in any state_dict
        factors[sl.adapter_name] = (u, s, v)
    return len(slots)


def _polar(y: Tensor) -> Tensor:
    """Polar factor Y (YᵀY)^{-1/2} of a batch of tall matrices (fp64 r×r eigh).

    Equals the reference's SVD polar ``U_y V_yᵀ`` (stiefel.py:36-44) in exact arithmetic; after a
    tangent step YᵀY = I + ΔᵀΔ ⪰ I, so the r×r Gram is well conditioned.
    """
    evals, evecs = torch.linalg.eigh(y.mT.double() @ y.double())
    inv_sqrt = (evecs * evals.clamp_min(1e-30).rsqrt().unsqueeze(-2)) @ evecs.mT
    return (y.double() @ inv_sqrt).to(y.dtype)


def _adam(state: list[dict], key: str, grad: Tensor, steps: Tensor, beta1: float, beta2: float,
          eps: float) -> Tensor:
    """AdamW's bias-corrected direction m̂ / (√v̂ + eps) of a stacked gradient (torch's formula)."""
    m = torch.stack([st["exp_avg_" + key] for st in state]).lerp_(grad, 1.0 - beta1)
    v = torch.stack([st["exp_avg_sq_" + key] for st in state]).mul_(beta2)
    v.addcmul_(grad, grad, value=1.0 - beta2)
    shape = (-1,) + (1,) * (grad.dim() - 1)
    bc1 = (1.0 - beta1 ** steps).view(shape).to(grad.dtype)
    bc2 = (1.0 - beta2 ** steps).view(shape).to(grad.dtype)
    for st, mi, vi in zip(state, m.unbind(0), v.unbind(0), strict=True):
        st["exp_avg_" + key], st["exp_avg_sq_" + key] = mi, vi
    return (m / bc1) / ((v.sqrt() / bc2.sqrt()) + eps)


class StelLA(torch.optim.Optimizer):
    r"""StelLA: AdamW made Riemannian on U, V ∈ Stiefel (arXiv 2510.01938), LoRA as s·U S Vᵀ.

    One step, batched over adapters of the same shape (model.py:473-540), X ∈ {U, V} in its
    tall (rows × r) orientation::

        ∇U, ∇S, ∇V = ∂L/∂B,  (∂L/∂A) V,  (∂L/∂A)ᵀ S           # Euclidean, one backward
        ξ_X   = ∇X − X ∇Xᵀ X                                  # canonical Riemannian gradient
                                                              #   (stiefel.py:10-11, model.py:499)
        d_X   = AdamW direction of ξ_X  (moments NOT projected or transported; no weight decay
                on U, V: layer.py:45-48, stella_trainer.py:21-27)
        Δ     = −lr · d_X · √(c / rows)   if rows ≠ c         # "gradient scaling", c = hidden
                                                              #   size (model.py:516-529)
        Δ     = Δ − X sym(XᵀΔ)                                # tangent projection (stiefel.py:15)
        X     ← polar(X + Δ)                                  # retraction (stiefel.py:42-44)
        S     ← (1 − lr·λ) S − lr · d_S                       # plain AdamW on S

    then ``lora_B = U`` and ``lora_A = S Vᵀ``. Other trainable parameters get plain AdamW with
    the same hyper-parameters (the reference runs one HF AdamW over everything).

    Args:
        model: a PEFT LoRA model initialised with :func:`stella_init`.
        lr: learning rate. Recipe (Llama-3-8B commonsense, r 32, α 64): 5e-4.
        betas: AdamW (β1, β2).
        eps: AdamW epsilon.
        weight_decay: decoupled decay λ on S and non-adapter parameters (never on U, V).
            Recipe: 0.
        grad_scaling: ``True`` (reference default): c = ``model.config.hidden_size``; a number:
            that c; ``False``: no scaling.
    """

    def __init__(self, model: nn.Module, lr: float = 5e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, grad_scaling: bool | float = True) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, but got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), but got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, but got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, but got {weight_decay}")
        if grad_scaling is True:
            c = getattr(getattr(model, "config", None), "hidden_size", None)
            if c is None:
                raise ValueError("grad_scaling=True reads model.config.hidden_size, but got a "
                                 "model without it: pass grad_scaling=<hidden size> or False")
            grad_scaling = float(c)
        elif grad_scaling is False:
            grad_scaling = 0.0
        elif not (isinstance(grad_scaling, (int, float)) and grad_scaling > 0):
            raise ValueError(f"grad_scaling must be True, False or a positive number, but got "
                             f"{grad_scaling!r}")
        self._slots = _slots(model)
        adapter_params = []
        for sl in self._slots:
            for p in (sl.B, sl.A):
                if hasattr(p, "ds_id") or hasattr(p, "device_mesh"):
                    raise ValueError(f"{sl.name}: StelLA runs on whole parameters (one process or "
                                     "DDP), but got a ZeRO-3/FSDP-sharded one")
            adapter_params += [sl.B, sl.A]
        ids = {id(p) for p in adapter_params}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        grad_scaling=float(grad_scaling))
        groups = [dict(params=adapter_params, kind="stella")]
        if others:
            groups.append(dict(params=others, kind="adamw"))
        super().__init__(groups, defaults)
        for sl in self._slots:
            self._init_state(sl)

    def _init_state(self, sl: _Slot) -> None:
        factors = getattr(sl.module, FACTORS_ATTR, {}).get(sl.adapter_name)
        if factors is None:
            raise ValueError(f"{sl.name}: no StelLA factors, but got a plain LoRA adapter: call "
                             "riemann_zero.stella.stella_init(model) before building StelLA")
        b, a = sl.B, sl.A
        master = torch.promote_types(b.dtype, torch.float32)
        u, s, v = (t.to(device=b.device, dtype=master, copy=True) for t in factors)
        diag = s.dim() == 1
        tol = 8 * torch.finfo(a.dtype).eps * max(1.0, float(a.detach().abs().max()))
        if not (torch.equal(b, u.to(b.dtype))
                and torch.allclose(a, _s_vt(s, v, diag).to(a.dtype), rtol=0, atol=tol)):
            raise ValueError(
                f"{sl.name}: lora_B/lora_A no longer equal the factors stella_init wrote, but got "
                "changed weights: build StelLA right after stella_init and resume with "
                "optimizer.load_state_dict (it rewrites lora_A/lora_B)")
        self.state[b].update(step=0, U=u, exp_avg_U=torch.zeros_like(u),
                             exp_avg_sq_U=torch.zeros_like(u))
        self.state[a].update(S=s, V=v, exp_avg_S=torch.zeros_like(s),
                             exp_avg_sq_S=torch.zeros_like(s), exp_avg_V=torch.zeros_like(v),
                             exp_avg_sq_V=torch.zeros_like(v))

    @torch.no_grad()
    def step(self, closure=None):
        """One StelLA step on the adapters and one AdamW step on the other parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "stella":
                self._stella_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _stella_step(self, group: dict) -> None:
        buckets = defaultdict(list)
        for sl in self._slots:
            if sl.B.grad is None or sl.A.grad is None:  # unused this step (model.py:485-490)
                continue
            st = self.state[sl.A]
            buckets[(sl.m, sl.n, sl.r, st["S"].dim(), st["S"].dtype, sl.B.device)].append(sl)
        for bucket in buckets.values():
            self._bucket_step(group, bucket)

    def _bucket_step(self, group: dict, bucket: list[_Slot]) -> None:
        lr, wd, c = group["lr"], group["weight_decay"], group["grad_scaling"]
        beta1, beta2 = group["betas"]
        st_b = [self.state[sl.B] for sl in bucket]
        st_a = [self.state[sl.A] for sl in bucket]
        u = torch.stack([st["U"] for st in st_b])
        s = torch.stack([st["S"] for st in st_a])
        v = torch.stack([st["V"] for st in st_a])
        diag = s.dim() == 2  # stacked vectors
        g_b = torch.stack([sl.B.grad for sl in bucket]).to(u.dtype)  # s·G V Sᵀ
        g_a = torch.stack([sl.A.grad for sl in bucket]).to(u.dtype)  # s·Uᵀ G
        if diag:
            g_s = (g_a * v.mT).sum(-1)  # diag(∂L/∂A · V)
            g_v = g_a.mT * s.unsqueeze(-2)
        else:
            g_s = g_a @ v
            g_v = g_a.mT @ s
        for st in st_b:
            st["step"] += 1
        steps = torch.tensor([st["step"] for st in st_b], dtype=torch.float64, device=u.device)
        new = {}
        for key, x, g, state in (("U", u, g_b, st_b), ("V", v, g_v, st_a)):
            xi = g - x @ (g.mT @ x)  # canonical Riemannian gradient (stiefel.py:10-11)
            delta = -lr * _adam(state, key, xi, steps, beta1, beta2, group["eps"])
            rows = x.shape[-2]
            if c and rows != c:  # model.py:524-529: divide by √(rows / c)
                delta = delta / math.sqrt(rows / c)
            delta = delta - x @ (0.5 * (x.mT @ delta + delta.mT @ x))  # stiefel.py:15-16
            new[key] = _polar(x + delta)
        d_s = _adam(st_a, "S", g_s, steps, beta1, beta2, group["eps"])
        new["S"] = s * (1.0 - lr * wd) - lr * d_s
        a_new = _s_vt(new["S"], new["V"], diag)
        for i, sl in enumerate(bucket):
            st_b[i]["U"], st_a[i]["S"], st_a[i]["V"] = new["U"][i], new["S"][i], new["V"][i]
            sl.B.copy_(new["U"][i])
            sl.A.copy_(a_new[i])

    def _adamw_step(self, group: dict) -> None:
        """torch.optim.AdamW's update, for the trainable parameters that are not adapters."""
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st.update(step=0, exp_avg_P=torch.zeros_like(p), exp_avg_sq_P=torch.zeros_like(p))
            st["step"] += 1
            steps = torch.tensor([float(st["step"])], dtype=torch.float64, device=p.device)
            d = _adam([st], "P", p.grad.unsqueeze(0), steps, beta1, beta2, group["eps"])[0]
            p.mul_(1.0 - group["lr"] * group["weight_decay"]).add_(d, alpha=-group["lr"])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, but fp32 masters keep their dtype, and lora_B/lora_A are rewritten."""
        super().load_state_dict(state_dict)
        keep_state_dtypes(self, state_dict)
        with torch.no_grad():
            for sl in self._slots:
                st_a = self.state[sl.A]
                sl.B.copy_(self.state[sl.B]["U"])
                sl.A.copy_(_s_vt(st_a["S"], st_a["V"], st_a["S"].dim() == 1))

    @torch.no_grad()
    def manifold_health(self) -> dict[str, float]:
        """max ‖UᵀU − I‖_F and max ‖VᵀV − I‖_F over the fp32/fp64 masters."""
        out = {"orth_err_U": 0.0, "orth_err_V": 0.0}
        for sl in self._slots:
            for key, st in (("U", self.state[sl.B]), ("V", self.state[sl.A])):
                x = st[key].double()
                eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
                out["orth_err_" + key] = max(out["orth_err_" + key],
                                             float((x.mT @ x - eye).norm()))
        return out
