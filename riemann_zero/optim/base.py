"""Shared machinery of the manifold optimizers: param groups, batching by shape, state, AdamW group.

Subclasses implement ``_update(group, bucket, x, g_u, g_k, states, shards) -> Point``: the
algorithm on one batch of same-shaped adapters, written with :mod:`riemann_zero.manifold` only.
The base class counts steps (``state["step"]`` per adapter, before ``_update`` runs), reads and
writes the rows through the sharding layer, and steps the other trainable parameters with the one
AdamW update of :mod:`riemann_zero.optim.adamw`.
"""

from __future__ import annotations

import abc
import logging
from collections import Counter, defaultdict

import torch
from torch import Tensor, nn

from riemann_zero.adapters.layout import Adapter, find_adapters
from riemann_zero.linalg import orthonormalize, reduce_sum
from riemann_zero.manifold import fixed_rank as geo
from riemann_zero.manifold import span
from riemann_zero.optim.adamw import adamw_group_step_, closure_loss
from riemann_zero.sharding.shards import resolve_shards

__all__ = ["ManifoldOptimizer", "adamw_group", "check_common", "keep_state_dtypes",
           "manifold_health"]

_log = logging.getLogger(__name__)


CPU_BUCKET_BYTES = 16 << 20


def _canonical(x: geo.Point, shards) -> geo.Point:
    """Re-factor a point first read from low-precision (bf16/fp16) parameters.

    Rounded to bf16, U is orthonormal only to ~1e-3 and V no longer spans range K; every later
    step would inherit both (the geometry assumes them). The point the model computes with,
    X̃ = Ũ K̃ᵀ, is kept: Ũ = Q R gives U = Q, K = K̃ Rᵀ, and a zero-step retraction re-derives an
    orthonormal V spanning range K with K = V Σ.
    """
    rm, rn = shards.reduce_m, shards.reduce_n
    q, rr, _, _ = orthonormalize(x.U, None, rm)
    v = orthonormalize(x.V, None, rn)[0]
    start = geo.Point(q, v, x.K @ rr.mT.to(x.K.dtype))
    zero = geo.Tangent(torch.zeros_like(start.U), torch.zeros_like(start.K))
    return geo.retract(start, zero, 1.0, rm, rn)


def check_common(lr: float, weight_decay: float, momentum: float | None = None) -> None:
    """The hyper-parameter checks every manifold optimizer shares (``ValueError``)."""
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, but got {lr}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, but got {weight_decay}")
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), but got {momentum}")


def adamw_group(lr: float, adamw_lr: float | None, betas: tuple[float, float], eps: float,
                weight_decay: float) -> dict:
    """Hyper-parameters of the AdamW group of the non-adapter parameters (lr defaults to the
    manifold group's)."""
    return dict(lr=lr if adamw_lr is None else adamw_lr, betas=tuple(betas), eps=eps,
                weight_decay=weight_decay)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class ManifoldOptimizer(torch.optim.Optimizer, abc.ABC):
    """Base class. Group 0 holds the manifold adapters; other trainable parameters go to AdamW.

    Args:
        model: a PEFT model in the manifold layout, or a list of :class:`Adapter` (then
            ``params`` lists the other trainable parameters, if any).
        defaults: hyper-parameters of the manifold group.
        adamw: lr, betas, eps, weight_decay of the AdamW group.
        params: extra trainable parameters when ``model`` is a list of adapters.
    """

    def __init__(self, model: nn.Module | list[Adapter], defaults: dict, adamw: dict,
                 params: list[nn.Parameter] | None = None) -> None:
        if isinstance(model, nn.Module):
            adapters = find_adapters(model)
            owned = {id(p) for ad in adapters for p in (ad.lora_A, ad.lora_B)}
            extras = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
        else:
            adapters, extras = list(model), list(params or [])
        if not adapters:
            raise ValueError("no manifold adapters given")
        groups = [{
            "params": [p for ad in adapters for p in (ad.lora_B, ad.lora_A)],
            "kind": "manifold",
            "adapters": [ad.name for ad in adapters],
            **defaults,
        }]
        if extras:
            groups.append({"params": extras, "kind": "adamw", **adamw})
        super().__init__(groups, defaults)
        self.adapters: dict[str, Adapter] = {ad.name: ad for ad in adapters}
        self.adapter_state: dict[str, dict] = defaultdict(dict)
        self.shards = None  # resolved at the first step, once an engine has laid out the params
        self._check_loaded_rows = False  # set by load_adapter_state_dict, cleared by step
        # One batched call per shape (default); False: a per-adapter loop (benchmarks, debugging).
        self.batch_by_shape = True
        # Cap on one batched call's factor bytes: "auto" = CPU_BUCKET_BYTES for CPU parameters
        # (stacked temporaries past a few MiB fall out of cache and cost more than the Python
        # loop saves; bench/overhead.py), no cap on accelerators where the step is launch-bound.
        self.bucket_bytes: int | str | None = "auto"
        self.last_step_comm: dict[str, int] = {}
        self.comm_total: Counter[str] = Counter()

    # ----------------------------------------------------------------------------------- step
    def _shards(self):
        if self.shards is None:
            self.shards = resolve_shards(list(self.adapters.values()), self.param_groups)
        return self.shards

    def _buckets(self, names: list[str]) -> list[list[Adapter]]:
        """Same-shaped adapters together, cut into calls of at most ``bucket_bytes``.

        Cuts depend on the global shapes only, so every rank forms the same buckets.
        """
        by_shape: dict[tuple, list[Adapter]] = defaultdict(list)
        for name in names:
            ad = self.adapters[name]
            by_shape[(ad.m, ad.n, ad.r) if self.batch_by_shape else name].append(ad)
        cap = self.bucket_bytes
        if cap == "auto":
            on_cpu = next(iter(self.adapters.values())).lora_B.device.type == "cpu"
            cap = CPU_BUCKET_BYTES if on_cpu else None
        out = []
        for bucket in by_shape.values():
            ad = bucket[0]
            calls = -(-len(bucket) * 4 * (ad.m + ad.n) * ad.r // cap) if cap else 1
            per = -(-len(bucket) // calls)  # even cuts: 32 → 16 + 16, not 27 + 5
            out += [bucket[i: i + per] for i in range(0, len(bucket), per)]
        return out

    @torch.no_grad()
    def step(self, closure=None):
        """One manifold step for every adapter (and one AdamW step for the other parameters)."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            if group.get("kind") == "manifold":
                if not group["params"]:  # ZeRO-3 steps one sub-group at a time; not ours now
                    continue
                shards = self._shards()
                shards.comm.clear()
                for bucket in self._buckets(group["adapters"]):
                    self._step_bucket(group, bucket, shards)
                self._check_loaded_rows = False
                self.last_step_comm = dict(shards.comm)  # bytes by collective, this step
                self.comm_total.update(shards.comm)
                if _log.isEnabledFor(logging.DEBUG):
                    _log.debug("manifold step communication (bytes): %s", self.last_step_comm)
            else:
                adamw_group_step_(group, self.state)
        return loss

    def _step_bucket(self, group: dict, bucket: list[Adapter], shards) -> None:
        r = bucket[0].r
        states = [self.adapter_state[ad.name] for ad in bucket]
        reads = [shards.read(ad, st) for ad, st in zip(bucket, states)]
        rows_m = [rd[0].shape[0] for rd in reads]
        rows_n = [rd[2].shape[0] for rd in reads]
        if self._check_loaded_rows:
            _check_state_rows(bucket, states, max(rows_m), max(rows_n))
        dtype = torch.float64 if reads[0][0].dtype == torch.float64 else torch.float32

        def stack(i: int, cols: slice, rows: list[int]) -> Tensor:  # only the r-wide halves used
            return torch.stack([_pad_rows(rd[i][:, cols].to(dtype), max(rows)) for rd in reads])

        first, last = slice(0, r), slice(r, 2 * r)
        x = geo.Point(stack(0, last, rows_m), stack(2, first, rows_n), stack(2, last, rows_n))
        x = span.restore_orthonormality(x, shards.reduce_m, shards.reduce_n)
        g_u, g_k = stack(1, first, rows_m), stack(3, last, rows_n)
        if bucket[0].lora_B.dtype not in (torch.float32, torch.float64) and not all(
                "canonical" in st for st in states):
            x = _canonical(x, shards)
            for st in states:
                st["canonical"] = True
        for st in states:
            st["step"] = st.get("step", 0) + 1
        new = self._update(group, bucket, x, g_u, g_k, states, shards)
        b_new = torch.cat([torch.zeros_like(new.U), new.U], dim=-1)
        at_new = torch.cat([new.V, new.K], dim=-1)
        for i, (ad, st) in enumerate(zip(bucket, states)):
            shards.write(ad, st, b_new[i, : rows_m[i]], at_new[i, : rows_n[i]])

    @abc.abstractmethod
    def _update(self, group: dict, bucket: list[Adapter], x: geo.Point, g_u: Tensor, g_k: Tensor,
                states: list[dict], shards) -> geo.Point:
        """The algorithm on one batch of same-shaped adapters; returns the new point."""

    # ------------------------------------------------------------------- per-adapter state
    @staticmethod
    def _get(states: list[dict], key: str) -> Tensor | None:
        if key not in states[0]:
            return None
        return torch.stack([st[key] for st in states])

    @staticmethod
    def _put(states: list[dict], key: str, value: Tensor) -> None:
        for i, st in enumerate(states):
            st[key] = value[i].clone()

    def _get_tangent(self, states: list[dict], key: str) -> geo.Tangent | None:
        du = self._get(states, key + "_U")
        return None if du is None else geo.Tangent(du, self._get(states, key + "_K"))

    def _put_tangent(self, states: list[dict], key: str, xi: geo.Tangent) -> None:
        self._put(states, key + "_U", xi.dU)
        self._put(states, key + "_K", xi.dK)

    # ------------------------------------------------------------------------------ AdamW
    # ------------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        """torch.optim state plus the per-adapter state, keyed by module name (survives ZeRO's
        substitution of param groups by flat partitions)."""
        sd = super().state_dict()
        sd["adapter_state"] = self.adapter_state_dict()
        return sd

    def adapter_state_dict(self) -> dict[str, dict]:
        """The per-adapter state alone (this rank's rows under sharding). Checkpointers that keep
        only torch.optim's ``state``/``param_groups`` (torch.distributed.checkpoint under FSDP2)
        must save this beside theirs and restore it with :meth:`load_adapter_state_dict`."""
        return {name: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
                for name, st in self.adapter_state.items()}

    def load_adapter_state_dict(self, adapter_state: dict[str, dict]) -> None:
        """Inverse of :meth:`adapter_state_dict`; keeps dtypes (fp32 masters of bf16 params)."""
        unknown = set(adapter_state) - set(self.adapters)
        if unknown:
            raise ValueError(
                f"optimizer state names adapters this model lacks: {sorted(unknown)[:5]}")
        self.adapter_state = defaultdict(dict)
        self._check_loaded_rows = True
        for name, st in adapter_state.items():
            device = self.adapters[name].lora_B.device
            self.adapter_state[name] = {
                k: (v.to(device=device, copy=True) if isinstance(v, Tensor) else v)
                for k, v in st.items()
            }

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        adapter_state = state_dict.pop("adapter_state", {})
        super().load_state_dict(state_dict)
        keep_state_dtypes(self, state_dict)  # fp32 AdamW moments of bf16 extras stay fp32
        self.load_adapter_state_dict(adapter_state)

    # --------------------------------------------------------------------------- health
    @torch.no_grad()
    def manifold_health(self) -> dict[str, float]:
        """max ‖UᵀU − I‖_F, max ‖VᵀV − I‖_F, max ‖Z‖_F and mean ‖X‖_F (= ‖K‖_F) over adapters.

        Collective under an engine (every rank calls it): one reduction per bucket, of the
        stacked 2r×2r Grams BᵀB and AAᵀ (which hold UᵀU, ZᵀZ, VᵀV and KᵀK). Meant for logged
        steps, not every step.
        """
        shards = self._shards()
        orth_u = orth_v = z_norm = 0.0
        x_norms: list[float] = []
        for bucket in self._buckets(list(self.adapters)):
            r = bucket[0].r
            reads = [shards.read(ad, self.adapter_state[ad.name]) for ad in bucket]
            gb = torch.stack([(b.mT @ b).double() for b, _, _, _ in reads])  # [Z U]ᵀ[Z U]
            ga = torch.stack([(at.mT @ at).double() for _, _, at, _ in reads])  # [V K]ᵀ[V K]
            if shards.reduce_n is None:  # n side whole on every rank: only the m side sums
                gb = reduce_sum(gb, shards.reduce_m)
            else:  # both sides split over the same ranks: one reduction serves both
                both = reduce_sum(torch.cat([gb, ga]), shards.reduce_m)
                gb, ga = both[: len(bucket)], both[len(bucket):]
            eye = torch.eye(r, dtype=torch.float64, device=gb.device)
            orth_u = max(orth_u, float((gb[:, r:, r:] - eye).norm(dim=(-2, -1)).max()))
            orth_v = max(orth_v, float((ga[:, :r, :r] - eye).norm(dim=(-2, -1)).max()))
            trace = torch.diagonal(gb[:, :r, :r], dim1=-2, dim2=-1).sum(-1)
            z_norm = max(z_norm, float(trace.clamp_min(0).sqrt().max()))
            trace_k = torch.diagonal(ga[:, r:, r:], dim1=-2, dim2=-1).sum(-1)
            x_norms += trace_k.clamp_min(0).sqrt().tolist()
        return {
            "orth_err_U": orth_u,
            "orth_err_V": orth_v,
            "max_norm_Z": z_norm,
            "mean_norm_X": sum(x_norms) / len(x_norms),
        }


def _check_state_rows(bucket: list[Adapter], states: list[dict], rows_m: int, rows_n: int
                      ) -> None:
    """After a load: the per-adapter tangent states (``*_U`` over this rank's m-side rows, ``*_K``
    over its n-side rows) must have the rows this rank steps now, else the checkpoint was written
    for another layout and stepping would fail deep inside the geometry (or mix rows)."""
    for ad, st in zip(bucket, states):
        for key, value in st.items():
            want = rows_m if key.endswith("_U") else rows_n if key.endswith("_K") else None
            if (want is not None and isinstance(value, Tensor) and value.dim() >= 2
                    and value.shape[-2] != want):  # (scalar second moments have no rows)
                raise ValueError(
                    f"optimizer state {key!r} of adapter {ad.name} holds {value.shape[-2]} rows, "
                    f"but this rank steps {want}: the checkpoint was written for another layout "
                    f"(another world size or engine, or before ZeRO's n-side all-to-all exchange, "
                    f"which changed the rows a rank keeps); resume with the world size and "
                    f"version that wrote it, or start the run again in a new output_dir")


def keep_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """After ``Optimizer.load_state_dict``: put back the saved floating state in its own dtype.

    torch casts floating state to the parameter's dtype; fp32 moments and masters of bf16
    parameters must come back bit-exact (resume = the identical next step).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, st in state_dict.get("state", {}).items():
        p = params[int(idx)]
        for k, v in st.items():
            if isinstance(v, Tensor) and k != "step" and v.is_floating_point():
                optimizer.state[p][k] = v.to(device=p.device, copy=True)


def manifold_health(obj) -> dict[str, float]:
    """Manifold health of an optimizer's fp32 masters (any optimizer with a ``manifold_health``
    method: the manifold optimizers, StelLA), or, given a model, of its adapter parameters."""
    if callable(getattr(obj, "manifold_health", None)):
        return obj.manifold_health()
    worst = 0.0
    for ad in find_adapters(obj):
        u = ad.lora_B[:, ad.r:].detach().double()
        worst = max(worst, float((u.mT @ u - torch.eye(ad.r, dtype=torch.float64)).norm()))
    return {"orth_err_U": worst}
