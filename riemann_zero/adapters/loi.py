"""LOI: locally optimal initialisation (arXiv 2507.12142 v2, Theorem 5.1, App. F/G).

Let G = Σ σᵢ uᵢ vᵢᵀ be the gradient of the loss at the pretrained W. The point
ΔW₀ = α · [u₁…u_r] [v_{r+1}…v_{2r}]ᵀ maximises ‖P_T G‖ over the rank-r manifold, and there the first
Riemannian gradient equals the best rank-2r approximation of G. The frozen weight is shifted to
W' = W − ΔW₀ (in fp32) so the model output is unchanged at step 0.

The top-2r singular vectors come from a randomized SVD (oversampling p, q power steps) whose
products G Ω and Gᵀ Y are accumulated by hooks during ordinary backward passes over fixed
calibration batches: for a linear layer G = Σ_t dy_t x_tᵀ, so G Ω = Σ_t dy_t (x_tᵀ Ω) and
Gᵀ Y = Σ_t x_t (dy_tᵀ Y). G itself (m×n) is never formed; 2(q + 1) passes in all.

The passes need the layer inputs and output gradients only, never a parameter gradient: every
parameter is frozen during them and the input embeddings' output made to require grad instead.
So LOI runs as well on a model an engine already partitioned (ZeRO-3 gathers each layer's weights
for forward and backward from its module hooks; FSDP2 unshards them), and no gradient reaches an
engine's buffers (ZeRO-3 would reduce any it saw into its partitions, and the first real step
would add it in).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from riemann_zero.adapters.layout import Adapter, find_adapters, set_point
from riemann_zero.linalg import Reduce, householder_basis
from riemann_zero.sharding.params import assign, shift_base

__all__ = ["loi_init", "sketch_gradients", "loi_rank_error"]


def _default_loss(model: nn.Module, batch: dict) -> Tensor:
    return model(**batch).loss


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


@contextlib.contextmanager
def _no_parameter_grads(model: nn.Module):
    """Freeze every parameter for the sketch passes; backward still reaches every layer because
    the input embeddings' output requires grad (a model without ``get_input_embeddings`` keeps
    its trainable parameters: the adapters then carry the gradient path)."""
    try:
        embed = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embed = None
    if embed is None:
        yield
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    handle = embed.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for p in trainable:
            p.requires_grad_(True)


class _Sketcher:
    """Forward hooks on the adapted modules that accumulate G·R (``side="m"``) or Gᵀ·R
    (``side="n"``) for a per-module test matrix R, during backward."""

    def __init__(self, adapters: list[Adapter]) -> None:
        self.adapters = adapters
        self.side = "m"
        self.test: dict[str, Tensor] = {}
        self.acc: dict[str, Tensor] = {}
        self.handles = [ad.module.register_forward_hook(self._hook(ad.name)) for ad in adapters]

    def _hook(self, name: str):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            test = self.test[name].to(x.device)
            if self.side == "m":  # G R = Σ dy (xᵀ R): R is n×k
                with torch.autocast(x.device.type, enabled=False):  # fp32 under mixed precision
                    xr = x.float() @ test

                def on_grad(dy, xr=xr):
                    self.acc[name] += dy.reshape(-1, dy.shape[-1]).float().mT @ xr
            else:  # Gᵀ R = Σ x (dyᵀ R): R is m×k

                def on_grad(dy, x=x, test=test):
                    self.acc[name] += x.float().mT @ (dy.reshape(-1, dy.shape[-1]).float() @ test)

            output.register_hook(on_grad)

        return hook

    def run(self, side: str, test: dict[str, Tensor], model: nn.Module, batches: list,
            loss_fn, reduce: Reduce, desc: str) -> dict[str, Tensor]:
        from tqdm.auto import tqdm

        self.side, self.test = side, test
        self.acc = {
            ad.name: torch.zeros(ad.m if side == "m" else ad.n, test[ad.name].shape[1],
                                 device=test[ad.name].device)
            for ad in self.adapters
        }
        for batch in tqdm(batches, desc=desc, disable=not _is_rank0(), leave=False):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"LOI calibration loss is {loss.item()}: check the data")
            loss.backward()
            model.zero_grad(set_to_none=True)
        if reduce is not None:  # data-parallel ranks saw different batches: sum their sketches
            for t in self.acc.values():
                reduce(t)
        return self.acc

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _orth(y: Tensor) -> Tensor:
    return householder_basis(y).float()


def sketch_gradients(model: nn.Module, batches: Iterable, *, extra: int = 16, power_steps: int = 1,
                     seed: int = 0, reduce: Reduce = None, loss_fn=None
                     ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Randomized SVD of every adapted layer's gradient, through 2(q + 1) backward passes.

    Returns {module name: (u (m×k), σ (k), v (n×k))} with k = min(2r + extra, m, n). The
    test matrices are drawn from ``seed`` in module order, so every rank draws the same ones.
    """
    adapters = find_adapters(model)
    batches = list(batches)
    if not batches:
        raise ValueError("LOI needs at least one calibration batch")
    loss_fn = loss_fn or _default_loss
    gen = torch.Generator().manual_seed(seed)
    device = adapters[0].lora_A.device
    omega = {
        ad.name: torch.randn(ad.n, min(2 * ad.r + extra, ad.m, ad.n), generator=gen).to(device)
        for ad in adapters
    }
    sketcher = _Sketcher(adapters)
    passes = 2 * (power_steps + 1)
    try:
        y = sketcher.run("m", omega, model, batches, loss_fn, reduce, f"LOI pass 1/{passes}")
        for i in range(power_steps):  # power iterations, re-orthonormalised each half step
            z = sketcher.run("n", {k: _orth(v) for k, v in y.items()}, model, batches, loss_fn,
                             reduce, f"LOI pass {2 * i + 2}/{passes}")
            y = sketcher.run("m", {k: _orth(v) for k, v in z.items()}, model, batches, loss_fn,
                             reduce, f"LOI pass {2 * i + 3}/{passes}")
        basis = {k: _orth(v) for k, v in y.items()}
        zt = sketcher.run("n", basis, model, batches, loss_fn, reduce,
                          f"LOI pass {passes}/{passes}")
    finally:
        sketcher.close()
    out = {}
    for name, q in basis.items():  # G ≈ Q Qᵀ G = Q (Gᵀ Q)ᵀ; SVD of the small n×k factor
        p, s, rt = torch.linalg.svd(zt[name].double(), full_matrices=False)
        out[name] = ((q.double() @ rt.mT).float(), s.float(), p.float())
    return out


def loi_rank_error(r: int, m: int, n: int, name: str) -> str | None:
    """Why LOI cannot start a rank-r adapter of the (m × n) module ``name`` (None if it can):
    it takes the top 2r singular pairs of the layer's gradient, so 2r ≤ min(m, n)."""
    if 2 * r > min(m, n):
        return (f"LOI needs 2r <= min(out, in), but {name} has r={r} and shape ({m}, {n}); use "
                f"r <= {min(m, n) // 2} or another init")
    return None


def loi_init(model: nn.Module, batches: Iterable, *, p: int = 16, q: int = 1,
             alpha: float | None = None, seed: int = 0, reduce: Reduce = None,
             loss_fn=None) -> dict[str, Tensor]:
    """Locally optimal initialisation of every manifold adapter, in place.

    Args:
        model: PEFT model in the manifold layout (``get_peft_model``); its adapters are reset.
        batches: fixed calibration batches (the same ones for every pass), dicts for ``model(**b)``
            unless ``loss_fn(model, batch)`` is given.
        p: oversampling; q: power steps (paper, LLMs: p = 16, q = 1).
        alpha: scale of ΔW₀ (paper: −0.01/√r; default).
        seed: seed of the random test matrices (identical on every rank).
        reduce: in-place sum over data-parallel ranks of the m×k / n×k sketches, or None.
    Returns:
        {module name: the top-2r singular values of its gradient}.
    """
    adapters = find_adapters(model)
    for ad in adapters:
        if hasattr(ad.module, "loi_B0"):
            raise ValueError(
                f"LOI was already applied to {ad.name}; build a fresh model to redo it")
        problem = loi_rank_error(ad.r, ad.m, ad.n, ad.name)
        if problem is not None:
            raise ValueError(problem)
    if q < 0 or p < 0:
        raise ValueError(f"p and q must be >= 0, but got p={p}, q={q}")
    was_training = model.training
    model.eval()  # deterministic passes; dropout only touches the LoRA branch anyway
    with torch.no_grad():  # X = B·A = 0 during the sketches: G is the gradient at the pretrained W
        for ad in adapters:  # (this rank's part only, under any engine layout)
            assign(ad.lora_A, torch.zeros(2 * ad.r, ad.n, device=ad.lora_A.device))
    with torch.enable_grad(), _no_parameter_grads(model):
        svd = sketch_gradients(model, batches, extra=p, power_steps=q, seed=seed, reduce=reduce,
                               loss_fn=loss_fn)
    model.train(was_training)
    sigmas = {}
    with torch.no_grad():
        for ad in adapters:
            u, s, v = svd[ad.name]
            a = alpha if alpha is not None else -0.01 / math.sqrt(ad.r)
            if a == 0:
                raise ValueError("alpha must be non-zero (ΔW₀ = 0 is not a rank-r point)")
            u_r, v_2 = u[:, : ad.r], v[:, ad.r: 2 * ad.r]
            b0, a0 = u_r.contiguous(), (a * v_2).mT.contiguous()  # ΔW₀ = B₀ A₀ (fp32)
            shift_base(ad.module.get_base_layer().weight, b0, a0)  # this rank's part, fp32
            device = ad.lora_A.device
            ad.module.register_buffer("loi_B0", b0.to(device))
            ad.module.register_buffer("loi_A0", a0.to(device))
            set_point(ad, u_r, v_2, a * v_2)
            sigmas[ad.name] = s[: 2 * ad.r]
    return sigmas
