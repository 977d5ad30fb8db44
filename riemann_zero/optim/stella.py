"""StelLA baseline (arXiv 2510.01938, NeurIPS 2025): LoRA as ΔW = s·U S Vᵀ with U, V on Stiefel.

Initialisation: :func:`riemann_zero.adapters.inits.stella_init`; geometry:
:mod:`riemann_zero.manifold.stiefel`; AdamW: :mod:`riemann_zero.optim.adamw`.

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
from collections import Counter, defaultdict

import torch
from torch import Tensor, nn

from riemann_zero.adapters.inits import FACTORS_ATTR, s_vt
from riemann_zero.adapters.layout import Adapter, lora_adapters
from riemann_zero.manifold import stiefel
from riemann_zero.optim.adamw import adamw_direction
from riemann_zero.optim.base import ManifoldOptimizer
from riemann_zero.sharding.layouts import layout_of

__all__ = ["StelLA"]


def _adam(state: list[dict], key: str, grad: Tensor, steps: Tensor, beta1: float, beta2: float,
          eps: float) -> Tensor:
    """AdamW's direction of a stacked gradient, with the moments kept per adapter in ``state``."""
    m = torch.stack([st["exp_avg_" + key] for st in state])
    v = torch.stack([st["exp_avg_sq_" + key] for st in state])
    d = adamw_direction(m, v, grad, steps.view((-1,) + (1,) * (grad.dim() - 1)), beta1, beta2, eps)
    for st, mi, vi in zip(state, m.unbind(0), v.unbind(0), strict=True):
        st["exp_avg_" + key], st["exp_avg_sq_" + key] = mi, vi
    return d


class StelLA(ManifoldOptimizer):
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
    the same hyper-parameters (the reference runs one HF AdamW over everything). The state of an
    adapter (``step``, U, S, V and their moments) is kept under its module name.

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
        self._slots = lora_adapters(model)
        if len({sl.name for sl in self._slots}) != len(self._slots):
            raise ValueError("StelLA keeps its state per module, but got a module with several "
                             "active LoRA adapters: activate one (model.set_adapter(name))")
        adapter_params = []
        for sl in self._slots:
            for p in (sl.lora_B, sl.lora_A):
                if not layout_of(p).whole:
                    raise ValueError(f"{sl.name}: StelLA runs on whole parameters (one process or "
                                     f"DDP), but got one laid out by {layout_of(p).title}")
            adapter_params += [sl.lora_B, sl.lora_A]
        ids = {id(p) for p in adapter_params}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        grad_scaling=float(grad_scaling))
        groups = [dict(params=adapter_params, kind="stella")]
        if others:
            groups.append(dict(params=others, kind="adamw"))
        super().__init__(groups, defaults, names={sl.name: sl.lora_B for sl in self._slots})
        for sl in self._slots:
            self._init_state(sl)

    def _init_state(self, sl: Adapter) -> None:
        factors = getattr(sl.module, FACTORS_ATTR, {}).get(sl.adapter_name)
        if factors is None:
            raise ValueError(f"{sl.name}: no StelLA factors, but got a plain LoRA adapter: call "
                             "riemann_zero.stella_init(model) before building StelLA")
        b, a = sl.lora_B, sl.lora_A
        master = torch.promote_types(b.dtype, torch.float32)
        u, s, v = (t.to(device=b.device, dtype=master, copy=True) for t in factors)
        diag = s.dim() == 1
        tol = 8 * torch.finfo(a.dtype).eps * max(1.0, float(a.detach().abs().max()))
        if not (torch.equal(b, u.to(b.dtype))
                and torch.allclose(a, s_vt(s, v, diag).to(a.dtype), rtol=0, atol=tol)):
            raise ValueError(
                f"{sl.name}: lora_B/lora_A no longer equal the factors stella_init wrote, but got "
                "changed weights: build StelLA right after stella_init and resume with "
                "optimizer.load_state_dict (it rewrites lora_A/lora_B)")
        zeros = torch.zeros_like
        self.named_state[sl.name].update(
            step=0, U=u, exp_avg_U=zeros(u), exp_avg_sq_U=zeros(u), S=s, V=v,
            exp_avg_S=zeros(s), exp_avg_sq_S=zeros(s), exp_avg_V=zeros(v), exp_avg_sq_V=zeros(v))

    def _step_group(self, group: dict, comm: Counter) -> bool:
        """One StelLA step of the ``"stella"`` group's adapters, batched by shape."""
        buckets = defaultdict(list)
        for sl in self._slots:
            if sl.lora_B.grad is None or sl.lora_A.grad is None:  # unused (model.py:485-490)
                continue
            st = self.named_state[sl.name]
            buckets[(sl.m, sl.n, sl.r, st["S"].dim(), st["S"].dtype, sl.lora_B.device)].append(sl)
        for bucket in buckets.values():
            self._bucket_step(group, bucket)
        return True

    def _bucket_step(self, group: dict, bucket: list[Adapter]) -> None:
        lr, wd, c = group["lr"], group["weight_decay"], group["grad_scaling"]
        beta1, beta2 = group["betas"]
        states = [self.named_state[sl.name] for sl in bucket]
        u = torch.stack([st["U"] for st in states])
        s = torch.stack([st["S"] for st in states])
        v = torch.stack([st["V"] for st in states])
        diag = s.dim() == 2  # stacked vectors
        g_b = torch.stack([sl.lora_B.grad for sl in bucket]).to(u.dtype)  # s·G V Sᵀ
        g_a = torch.stack([sl.lora_A.grad for sl in bucket]).to(u.dtype)  # s·Uᵀ G
        if diag:
            g_s = (g_a * v.mT).sum(-1)  # diag(∂L/∂A · V)
            g_v = g_a.mT * s.unsqueeze(-2)
        else:
            g_s = g_a @ v
            g_v = g_a.mT @ s
        for st in states:
            st["step"] += 1
        steps = torch.tensor([st["step"] for st in states], dtype=torch.float64, device=u.device)
        new = {}
        for key, x, g in (("U", u, g_b), ("V", v, g_v)):
            xi = stiefel.rgrad(x, g)  # canonical Riemannian gradient
            delta = -lr * _adam(states, key, xi, steps, beta1, beta2, group["eps"])
            rows = x.shape[-2]
            if c and rows != c:  # model.py:524-529: divide by √(rows / c)
                delta = delta / math.sqrt(rows / c)
            new[key] = stiefel.retract(x, stiefel.project(x, delta))
        d_s = _adam(states, "S", g_s, steps, beta1, beta2, group["eps"])
        new["S"] = s * (1.0 - lr * wd) - lr * d_s
        a_new = s_vt(new["S"], new["V"], diag)
        for i, sl in enumerate(bucket):
            states[i]["U"], states[i]["S"], states[i]["V"] = new["U"][i], new["S"][i], new["V"][i]
            sl.lora_B.copy_(new["U"][i])
            sl.lora_A.copy_(a_new[i])

    def load_state_dict(self, state_dict: dict) -> None:
        """The base's load (fp32 masters keep their dtype), which rewrites lora_B/lora_A; also
        reads state dicts written before StelLA kept its state per module name."""
        super().load_state_dict(_named_from_params(state_dict, self._slots))

    def load_named_state_dict(self, named_state: dict[str, dict]) -> None:
        """The base's load, then lora_B = U and lora_A = S Vᵀ from the loaded masters."""
        missing = [sl.name for sl in self._slots if sl.name not in named_state]
        if missing:
            raise ValueError(f"StelLA state lacks the adapters {missing[:3]}, but got a state "
                             f"dict without them: load one saved by StelLA on the same model")
        super().load_named_state_dict(named_state)
        with torch.no_grad():
            for sl in self._slots:
                st = self.named_state[sl.name]
                sl.lora_B.copy_(st["U"])
                sl.lora_A.copy_(s_vt(st["S"], st["V"], st["S"].dim() == 1))

    @torch.no_grad()
    def manifold_health(self) -> dict[str, float]:
        """max ‖UᵀU − I‖_F and max ‖VᵀV − I‖_F over the fp32/fp64 masters."""
        out = {"orth_err_U": 0.0, "orth_err_V": 0.0}
        for sl in self._slots:
            for key in ("U", "V"):
                x = self.named_state[sl.name][key].double()
                eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
                out["orth_err_" + key] = max(out["orth_err_" + key],
                                             float((x.mT @ x - eye).norm()))
        return out


def _named_from_params(state_dict: dict, slots: list[Adapter]) -> dict:
    """A StelLA state dict of the earlier layout (U and its moments in torch.optim's state of
    lora_B, S, V and theirs in that of lora_A, the adapters' parameters first in module order)
    in the present one (per module name); others pass unchanged."""
    if "named_state" in state_dict:
        return state_dict
    state = dict(state_dict.get("state", {}))
    if not any("U" in st for st in state.values()):
        return state_dict
    named = {}
    for i, sl in enumerate(slots):
        named[sl.name] = {**state.pop(2 * i, {}), **state.pop(2 * i + 1, {})}
    return {**state_dict, "state": state, "named_state": named}
