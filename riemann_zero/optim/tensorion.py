"""Tensorion: Muon for tensors of any order (arXiv 2606.25975; docs/design.md §8).

One class for 1..N ranks. Each whole tensor's direction is computed by one owner rank (round robin
over the tensors of a param group); the other ranks send it their piece of the momentum and get
back their piece of the direction. The layouts (no engine, DDP, FSDP2 ``Shard(0)``, DeepSpeed
ZeRO-1/2/3 flat partitions) are read through :mod:`riemann_zero.sharding.pieces`; the geometry is
:mod:`riemann_zero.manifold.tensor`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

from riemann_zero.linalg import polar_factor
from riemann_zero.manifold import tensor as geo
from riemann_zero.optim.base import RMS_MATCH, ManifoldOptimizer, check_hyper
from riemann_zero.sharding import pieces as sh
from riemann_zero.sharding.comm import CountingBroadcast, CountingReduce
from riemann_zero.sharding.params import layout_of

__all__ = ["Tensorion", "tensorion_model"]

# Group keys a user may override per param group (beside params and logical_shape).
_GROUP_KEYS = ("lr", "momentum", "weight_decay", "nesterov", "unfolding", "ortho", "ns_steps",
               "lr_scale", "reselect_every", "per_slice")


class Tensorion(ManifoldOptimizer):
    r"""Tensorion: the LMO of a tensor norm, the polar factor of one chosen unfolding.

    For each parameter of order ≥ 2 (viewed as its group's ``logical_shape`` if given)::

        b ← β b + g                                   # heavy-ball momentum (raw gradient sum)
        u = g + β b  if nesterov  else  b
        τ = argmax_τ ‖u_(τ)‖_*  ("online", every reselect_every steps)  |  most square ("offline")
        D = fold_τ(polar(u_(τ)))                      # SVD or Muon's Newton–Schulz
        p ← (1 − η λ) p − η s D,   s = 0.2·√max(rows, cols) of u_(τ)  (lr_scale="rms"), else 1

    On a matrix this is Muon (``torch.optim.Muon`` with ``nesterov=False`` and, for
    ``lr_scale="rms"``, ``adjust_lr_fn="match_rms_adamw"``; its EMA buffer is (1 − β)·b and the
    polar factor is scale-free). Parameters of order < 2 get the package's AdamW update. The
    chosen τ is kept in the state (exact resume) and is the owner's choice on every rank.

    Args:
        params: parameters or param groups; a group may set ``logical_shape`` (a shape with the
            parameter's number of elements, e.g. a fused QKV ``3·heads·d × hidden`` weight as
            ``(3, heads, d, hidden)``) and override any hyper-parameter below except the AdamW ones.
        lr: η. momentum: β. weight_decay: λ (decoupled). nesterov: Nesterov momentum.
        unfolding: ``"offline"`` (the most square unfolding, fixed by the shape) or ``"online"``
            (the exact LMO's unfolding, argmax nuclear norm).
        ortho: ``"newton_schulz"`` (Muon's quintic iteration, ``ns_steps``) or ``"svd"``.
        lr_scale: ``"rms"`` or ``None``.
        reselect_every: online selection every this many steps (the τ is kept in between).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW update of order < 2
            parameters (``adamw_lr=None``: the group's ``lr``).

    A param group may also set ``per_slice=True``: a baseline, not Tensorion. Each slice along
    mode 0 is its own matrix (mode 1 × the remaining modes) moved by Muon (per-expert Muon on an
    expert stack E × out × in); its ``unfolding`` state is -1.

    Attributes:
        last_step_comm: bytes this rank handed to each collective in the last step (``reduce``
            of the momentum onto each tensor's owner, ``broadcast`` of its direction).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.95,
                 weight_decay: float = 0.1, *, nesterov: bool = False, unfolding: str = "offline",
                 ortho: str = "newton_schulz", ns_steps: int = 5, lr_scale: str | None = "rms",
                 reselect_every: int = 1, adamw_lr: float | None = None,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        unfolding=unfolding, ortho=ortho, ns_steps=ns_steps, lr_scale=lr_scale,
                        reselect_every=reselect_every)
        check_hyper(dict(defaults, adamw_lr=adamw_lr, adamw_weight_decay=adamw_weight_decay))
        params = list(params)
        if not params:
            raise ValueError("Tensorion got an empty parameter list")
        user_groups = params if isinstance(params[0], dict) else [{"params": params}]
        tensor_groups, adamw_groups = [], []
        self._tensors: dict[str, tuple[Tensor, tuple[int, ...]]] = {}
        for gi, user in enumerate(user_groups):
            user = dict(user)
            ps = list(user.pop("params"))
            shape = user.pop("logical_shape", None)
            unknown = set(user) - set(_GROUP_KEYS)
            if unknown:
                raise ValueError(f"param group {gi}: unknown keys {sorted(unknown)}; valid: "
                                 f"params, logical_shape, {', '.join(_GROUP_KEYS)}")
            check_hyper({**defaults, **user}, f"param group {gi}: ")
            big, small = [], []
            for pi, p in enumerate(ps):
                full = sh.stored_shape(p)
                logical = full
                if shape is not None:
                    logical = tuple(int(s) for s in shape)
                    if math.prod(logical) != math.prod(full):
                        raise ValueError(
                            f"param group {gi}: logical_shape {logical} has "
                            f"{math.prod(logical)} elements, but parameter {pi} of shape {full} "
                            f"has {math.prod(full)}; give a shape with the same number of elements")
                (big if len(logical) >= 2 else small).append((p, logical))
            if big:
                k = len(tensor_groups)
                names = [f"{k}.{j}" for j in range(len(big))]
                for name, (p, logical) in zip(names, big):
                    self._tensors[name] = (p, logical)
                tensor_groups.append({"params": [p for p, _ in big], "kind": "tensorion",
                                      "tensor_names": names, **user})
            if small:
                group_lr = user.get("lr", lr)
                adamw_groups.append({"params": [p for p, _ in small], "kind": "adamw",
                                     "lr": group_lr if adamw_lr is None else adamw_lr,
                                     "betas": tuple(adamw_betas), "eps": adamw_eps,
                                     "weight_decay": adamw_weight_decay})
        super().__init__(tensor_groups + adamw_groups, defaults,
                         names={name: p for name, (p, _) in self._tensors.items()})

    # ----------------------------------------------------------------------------------- step
    def _entries(self, group: dict) -> tuple[list[tuple[str, Tensor, tuple]], Tensor | None]:
        """(name, parameter, logical shape) of the tensors stepped now, and the flat partition
        the engine handed over (ZeRO), if any."""
        entries = [(n, *self._tensors[n]) for n in group["tensor_names"]]
        layout = layout_of(entries[0][1])
        if not layout.flat:
            return entries, None
        flat = group["params"][0]  # ZeRO-3: only the tensors of the sub-group being stepped
        return [e for e in entries if layout.in_partition(e[1], flat)], flat

    def _step_group(self, group: dict, comm: Counter) -> bool:
        """One step of a ``"tensorion"`` group's tensors held now; False if there were none."""
        entries, flat = self._entries(group)
        if not entries:
            return False
        pg = sh.process_group(entries[0][1])
        world, rank = sh.world_and_rank(pg)
        reduce = CountingReduce(comm, "reduce.momentum", pg)
        broadcast = CountingBroadcast(comm, "broadcast.direction", pg)
        beta = group["momentum"]
        owned: dict[int, Tensor] = {}  # index → whole momentum, on its owner
        pieces, stepped = [], []
        for i, (name, p, shape) in enumerate(entries):
            piece = sh.piece_of(p, flat)
            pieces.append(piece)
            st = self.named_state[name]
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            device = p.device if piece.value is None else piece.value.device
            if piece.grad is None and world == 1:
                continue  # torch.optim convention: no gradient, no step (single process only)
            g = (torch.zeros(piece.numel, dtype=dtype, device=device) if piece.grad is None
                 else piece.grad.to(dtype))
            if "momentum" not in st:
                st["step"] = 0
                st["momentum"] = torch.zeros(piece.numel, dtype=dtype, device=device)
            st["step"] += 1
            stepped.append(i)
            buf = st["momentum"]
            buf.mul_(beta).add_(g)
            u = g.add(buf, alpha=beta) if group["nesterov"] else buf
            owner = i % world
            if world == 1 or piece.whole:
                if rank == owner:
                    owned[i] = u
                continue
            whole = torch.zeros(math.prod(shape), dtype=dtype, device=device)
            whole[piece.start: piece.start + piece.numel] = u
            reduce(whole, sh.global_rank(pg, owner))
            if rank == owner:
                owned[i] = whole
        directions = self._directions(group, entries, owned)
        for i in stepped:
            name, _, shape = entries[i]
            st, piece = self.named_state[name], pieces[i]
            numel = math.prod(shape)
            owner = i % world
            if world > 1:
                out = directions.get(i)
                if out is None:
                    out = torch.zeros(numel + 1, dtype=st["momentum"].dtype,
                                      device=st["momentum"].device)
                out = broadcast(out, sh.global_rank(pg, owner))
            else:
                out = directions[i]
            st["unfolding"] = int(out[-1].item())
            if piece.numel == 0:
                continue
            scale = 1.0
            if group["lr_scale"] == "rms":
                if st["unfolding"] < 0:  # per_slice: the slice's matrix
                    rows_cols = (shape[1], math.prod(shape[2:]))
                else:
                    tau = geo.unfoldings(len(shape))[st["unfolding"]]
                    rows_cols = geo.unfold_shape(shape, tau)
                scale = RMS_MATCH * math.sqrt(max(rows_cols))
            d = out[piece.start: piece.start + piece.numel]
            value = piece.value
            work = value if value.dtype == d.dtype else value.to(d.dtype)
            work.mul_(1.0 - group["lr"] * group["weight_decay"]).add_(
                d, alpha=-group["lr"] * scale)
            if work is not value:
                value.copy_(work)
        return True

    def _directions(self, group: dict, entries: list, owned: dict[int, Tensor]
                    ) -> dict[int, Tensor]:
        """For each tensor this rank owns: [D flattened, τ index], batched by shape."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i in owned:
            by_shape[entries[i][2]].append(i)
        out: dict[int, Tensor] = {}
        for shape, idx in by_shape.items():
            stack = torch.stack([owned[i].reshape(shape) for i in idx])
            if group.get("per_slice") and len(shape) >= 3:  # baseline: Muon on each slice
                mats = stack.reshape(len(idx) * shape[0], shape[1], -1)
                d = polar_factor(mats, group["ortho"], group["ns_steps"]).reshape(stack.shape)
                for k, i in enumerate(idx):
                    out[i] = torch.cat([d[k].reshape(-1), d.new_tensor([-1.0])])
                continue
            if group["unfolding"] == "offline":
                taus = [geo.offline_unfolding(shape)] * len(idx)
            else:
                states = [self.named_state[entries[i][0]] for i in idx]
                due = [("unfolding" not in st or (st["step"] - 1) % group["reselect_every"] == 0)
                       for st in states]
                fresh = iter(geo.online_unfolding(stack[[k for k, d in enumerate(due) if d]])
                             .tolist() if any(due) else [])
                taus = [next(fresh) if d else st["unfolding"] for d, st in zip(due, states)]
            d = geo.lmo(stack, taus, group["ortho"], group["ns_steps"])
            for k, i in enumerate(idx):
                out[i] = torch.cat([d[k].reshape(-1), d.new_tensor([float(taus[k])])])
        return out


def tensorion_model(model: torch.nn.Module, lr: float = 1e-3, momentum: float = 0.95,
                    weight_decay: float = 0.1, *, nesterov: bool = False,
                    unfolding: str = "offline", ortho: str = "newton_schulz", ns_steps: int = 5,
                    lr_scale: str | None = "rms", reselect_every: int = 1,
                    adamw_lr: float | None = None,
                    adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                    adamw_weight_decay: float = 0.0, per_slice: bool = False) -> Tensorion:
    """Tensorion on every trainable parameter of a model (the driver's builder).

    On a PEFT LoRA model that is per-factor Muon on ``lora_A``/``lora_B``; under full fine-tuning
    each whole tensor (an MoE expert stack E × out × in) is one Tensorion tensor, or, with
    ``per_slice=True`` (baseline), one Muon matrix per expert. Order < 2 parameters go to AdamW.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach LoRA or set "
                         "model.trainable")
    group = {"params": params, "per_slice": bool(per_slice)}
    return Tensorion([group], lr=lr, momentum=momentum, weight_decay=weight_decay,
                     nesterov=nesterov, unfolding=unfolding, ortho=ortho, ns_steps=ns_steps,
                     lr_scale=lr_scale, reselect_every=reselect_every, adamw_lr=adamw_lr,
                     adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                     adamw_weight_decay=adamw_weight_decay)
