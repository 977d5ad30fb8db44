"""The one base of the package's optimizers: Riemannion, RiemannSGD, RiemannAdam, StelLA, Tensorion.

What every one of them gets from :class:`ManifoldOptimizer`:

- **state keyed by name** (``named_state[adapter or tensor name]``): it survives ZeRO's
  substitution of param groups by flat partitions, and :meth:`~ManifoldOptimizer.state_dict`
  saves it beside torch.optim's own; :meth:`~ManifoldOptimizer.named_state_dict` /
  :meth:`~ManifoldOptimizer.load_named_state_dict` hand it alone to checkpointers that keep only
  torch.optim's part. Floating state comes back in its own dtype (:func:`keep_state_dtypes`).
- **one step skeleton**: every param group has a ``kind``. ``"adamw"`` groups (the trainable
  parameters the algorithm does not move) take the one AdamW update of
  :mod:`riemann_zero.optim.adamw`; every other group goes to ``_step_group``, which dispatches on
  the kind. The base steps ``"manifold"`` groups, fixed-rank adapters in the rank-2r layout, in
  same-shaped buckets (:mod:`riemann_zero.optim.buckets`), counting ``step`` per adapter before
  the subclass's ``_update`` computes the new point of one bucket (Riemannion, RiemannSGD,
  RiemannAdam). StelLA (``"stella"``: U, V on Stiefel) and Tensorion (``"tensorion"``: whole
  tensors of any order) override ``_step_group`` for their own kind.
- **one hyper-parameter check** (:func:`check_hyper`, ``ValueError("… but got …")``), run on the
  defaults at construction.
- **communication accounting**: ``last_step_comm`` (bytes this rank handed to each collective in
  the last optimizer step) and ``comm_total``.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import torch
from torch import Tensor, nn

from riemann_zero.adapters.layout import Adapter, find_adapters
from riemann_zero.linalg import POLAR_METHODS
from riemann_zero.manifold import fixed_rank as geo
from riemann_zero.manifold.tensor import UNFOLDINGS
from riemann_zero.optim import buckets as bk
from riemann_zero.optim.adamw import adamw_group_step_, closure_loss
from riemann_zero.sharding.shards import resolve_shards

__all__ = ["ManifoldOptimizer", "RMS_MATCH", "adamw_group", "check_hyper", "fixed_rank_groups",
           "keep_state_dtypes", "manifold_health"]

_log = logging.getLogger(__name__)

# Moonlight's RMS-matching factor (arXiv 2502.16982 §2.2). A polar factor O of an m×n matrix has
# its min(m, n) singular values at 1, so ‖O‖_F = √min(m, n) and its entries' RMS is
# 1/√max(m, n); AdamW's updates have an RMS of about 0.2–0.4, so 0.2·√max(m, n)·O gives an update
# of RMS 0.2 and lets Muon-type optimizers reuse AdamW's lr and weight decay. torch.optim.Muon's
# adjust_lr_fn="match_rms_adamw" uses the same 0.2·√max(rows, cols).
RMS_MATCH = 0.2

# hyper-parameter → (is it valid, what a valid value is); every optimizer here checks the keys it
# has against this one table.
_RULES = {
    "lr": (lambda v: v >= 0.0, "must be >= 0"),
    "weight_decay": (lambda v: v >= 0.0, "must be >= 0"),
    "momentum": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "betas": (lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v),
              "must be two numbers in [0, 1)"),
    "eps": (lambda v: v > 0.0, "must be > 0"),
    "ortho": (lambda v: v in POLAR_METHODS, f"must be one of {POLAR_METHODS}"),
    "ns_steps": (lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1"),
    "ortho_eps": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "lr_scale": (lambda v: v in (None, "rms"), "must be None or 'rms'"),
    "momentum_buffer": (lambda v: v in ("raw", "paper"), "must be 'raw' or 'paper'"),
    "unfolding": (lambda v: v in UNFOLDINGS, f"must be one of {UNFOLDINGS}"),
    "reselect_every": (lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1"),
    "adamw_lr": (lambda v: v is None or v >= 0.0, "must be >= 0 or None"),
    "adamw_weight_decay": (lambda v: v >= 0.0, "must be >= 0"),
}

# Keys under which earlier versions saved the named state (their checkpoints still load).
_EARLIER_KEYS = ("adapter_state", "tensor_state")


def check_hyper(hp: dict, where: str = "") -> None:
    """Raise ``ValueError("<where><key> must be …, but got …")`` for the first invalid
    hyper-parameter of ``hp`` (keys without a rule are not checked)."""
    for key, value in hp.items():
        rule = _RULES.get(key)
        if rule is None:
            continue
        try:
            ok = bool(rule[0](value))
        except TypeError:  # a string where a number belongs, a number where a pair does
            ok = False
        if not ok:
            raise ValueError(f"{where}{key} {rule[1]}, but got {value!r}")


def adamw_group(lr: float, adamw_lr: float | None, betas: tuple[float, float], eps: float,
                weight_decay: float) -> dict:
    """Hyper-parameters of the AdamW group of the non-adapter parameters (lr defaults to the
    manifold group's)."""
    check_hyper(dict(adamw_lr=adamw_lr, adamw_weight_decay=weight_decay))
    return dict(lr=lr if adamw_lr is None else adamw_lr, betas=tuple(betas), eps=eps,
                weight_decay=weight_decay)


def fixed_rank_groups(model: nn.Module | list[Adapter], defaults: dict, adamw: dict,
                      params: list[nn.Parameter] | None = None) -> tuple[list[dict], list[Adapter]]:
    """Param groups of a fixed-rank optimizer: one ``"manifold"`` group of the adapters (found in
    a PEFT model in the manifold layout, or given as a list with ``params`` the other trainable
    parameters), one ``"adamw"`` group of the other trainable parameters if any."""
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
    return groups, adapters


class ManifoldOptimizer(torch.optim.Optimizer):
    """Base class of the package's optimizers (see the module docstring for what it does).

    Args:
        groups: the param groups, each with a ``kind`` (``"adamw"`` groups carry lr, betas, eps,
            weight_decay).
        defaults: the hyper-parameters of the algorithm's groups, checked by :func:`check_hyper`.
        names: every name the state may be kept under (adapter or tensor name) → a parameter of
            it (its device is where loaded state goes); ``None``: the adapters' names.
        adapters: the fixed-rank adapters of the ``"manifold"`` groups (none for StelLA and
            Tensorion).
    """

    def __init__(self, groups: list[dict], defaults: dict, names: dict[str, Tensor] | None = None,
                 adapters: list[Adapter] = ()) -> None:
        check_hyper(defaults)
        super().__init__(groups, defaults)
        self._names = {ad.name: ad.lora_B for ad in adapters} if names is None else names
        self.named_state: dict[str, dict] = defaultdict(dict)
        self.last_step_comm: dict[str, int] = {}
        self.comm_total: Counter[str] = Counter()
        self._comm_step = -1
        self._just_loaded = False  # set by load_named_state_dict, cleared by the next step
        # The fixed-rank adapters ("manifold" groups) and how they are batched.
        self.adapters: dict[str, Adapter] = {ad.name: ad for ad in adapters}
        self.shards = None  # resolved at the first step, once an engine has laid out the params
        # One batched call per shape (default); False: a per-adapter loop (benchmarks, debugging).
        self.batch_by_shape = True
        # Cap on one batched call's factor bytes: "auto" = CPU_BUCKET_BYTES for CPU parameters,
        # no cap on accelerators where the step is launch-bound.
        self.bucket_bytes: int | str | None = "auto"

    # ----------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group: the algorithm's groups, then AdamW on the others."""
        loss = closure_loss(closure)
        comm: Counter[str] = Counter()
        stepped = False
        for group in self.param_groups:
            if group.get("kind") == "adamw":
                adamw_group_step_(group, self.state)
            elif group["params"]:  # ZeRO-3 steps one sub-group at a time: empty = not ours now
                stepped |= self._step_group(group, comm)
        if stepped:
            self._just_loaded = False
            self._count_comm(comm)
        return loss

    def _count_comm(self, comm: Counter) -> None:
        """Add one call's bytes to ``last_step_comm`` and ``comm_total``.

        DeepSpeed calls step() once per param group (ZeRO-1/2) or sub-group (ZeRO-3): calls that
        advance no step counter belong to the same optimizer step.
        """
        count = max((st.get("step", 0) for st in self.named_state.values()), default=0)
        if count != self._comm_step:
            self.last_step_comm, self._comm_step = {}, count
        merged = Counter(self.last_step_comm)
        merged.update(comm)
        self.last_step_comm = dict(merged)
        self.comm_total.update(comm)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("optimizer step communication (bytes): %s", self.last_step_comm)

    def _step_group(self, group: dict, comm: Counter) -> bool:
        """Step one group of the algorithm (held on this rank now); False if nothing moved.

        The base steps ``"manifold"`` groups; subclasses with another kind override this.
        """
        if group.get("kind") != "manifold":
            raise ValueError(f"{type(self).__name__} has no step for param groups of kind "
                             f"{group.get('kind')!r}, but got one; build the optimizer again "
                             f"rather than adding groups")
        shards = self._shards()
        shards.comm.clear()
        for bucket in self._buckets(group["adapters"]):
            states = [self.named_state[ad.name] for ad in bucket]
            x, g_u, g_k, rows_m, rows_n = bk.read_bucket(bucket, states, shards,
                                                         self._just_loaded)
            for st in states:
                st["step"] = st.get("step", 0) + 1
            new = self._update(group, bucket, x, g_u, g_k, states, shards)
            bk.write_bucket(bucket, states, shards, new, rows_m, rows_n)
        comm.update(shards.comm)
        return True

    def _update(self, group: dict, bucket: list[Adapter], x: geo.Point, g_u: Tensor, g_k: Tensor,
                states: list[dict], shards) -> geo.Point:
        """The algorithm on one bucket of same-shaped fixed-rank adapters (point ``x``, gradient
        blocks G V and Gᵀ U); returns the new point. Subclasses with ``"manifold"`` groups
        override it; the others (StelLA, Tensorion) never build such a group."""
        raise TypeError(f"{type(self).__name__} got a 'manifold' param group, but it steps no "
                        f"fixed-rank adapters")

    def _shards(self):
        if self.shards is None:
            self.shards = resolve_shards(list(self.adapters.values()), self.param_groups)
        return self.shards

    def _buckets(self, names: list[str]) -> list[list[Adapter]]:
        """The fixed-rank adapters ``names`` in batched calls (:func:`buckets.cut_buckets`)."""
        cap = self.bucket_bytes
        if cap == "auto":
            on_cpu = next(iter(self.adapters.values())).lora_B.device.type == "cpu"
            cap = bk.CPU_BUCKET_BYTES if on_cpu else None
        return bk.cut_buckets([self.adapters[n] for n in names], self.batch_by_shape, cap)

    # -------------------------------------------------------------------- state per name
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

    # ------------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        """torch.optim's state (AdamW moments of the other parameters) plus ``named_state``."""
        sd = super().state_dict()
        sd["named_state"] = self.named_state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of :meth:`state_dict`; floating state keeps its saved dtype."""
        state_dict = dict(state_dict)
        named = state_dict.pop("named_state", None)
        for key in _EARLIER_KEYS:  # checkpoints written before the state had one name
            earlier = state_dict.pop(key, None)
            named = earlier if named is None else named
        super().load_state_dict(state_dict)
        keep_state_dtypes(self, state_dict)  # fp32 AdamW moments of bf16 extras stay fp32
        self.load_named_state_dict({} if named is None else named)

    def named_state_dict(self) -> dict[str, dict]:
        """The state kept per name alone (this rank's rows under sharding). Checkpointers that
        keep only torch.optim's ``state``/``param_groups`` (torch.distributed.checkpoint under
        FSDP2) must save this beside theirs and restore it with :meth:`load_named_state_dict`."""
        return {name: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
                for name, st in self.named_state.items()}

    def load_named_state_dict(self, named_state: dict[str, dict]) -> None:
        """Inverse of :meth:`named_state_dict`; keeps dtypes (fp32 masters of bf16 params)."""
        unknown = set(named_state) - set(self._names)
        if unknown:
            raise ValueError(
                f"optimizer state names {sorted(unknown)[:5]}, which this optimizer lacks; was "
                f"it built from the same model and parameters?")
        self.named_state = defaultdict(dict)
        self._just_loaded = True
        for name, st in named_state.items():
            p = self._names[name]
            device = p.device if p.device.type != "meta" else "cpu"
            self.named_state[name] = {
                k: (v.to(device=device, copy=True) if isinstance(v, Tensor) else v)
                for k, v in st.items()}

    # --------------------------------------------------------------------------- health
    @torch.no_grad()
    def manifold_health(self) -> dict[str, float]:
        """max ‖UᵀU − I‖_F, max ‖VᵀV − I‖_F, max ‖Z‖_F and mean ‖X‖_F (= ‖K‖_F) over the
        fixed-rank adapters (empty without any).

        Collective under an engine (every rank calls it): one reduction per bucket, of the
        stacked 2r×2r Grams. Meant for logged steps, not every step.
        """
        if not self.adapters:
            return {}
        shards = self._shards()
        orth_u = orth_v = z_norm = 0.0
        x_norms: list[float] = []
        for bucket in self._buckets(list(self.adapters)):
            states = [self.named_state[ad.name] for ad in bucket]
            u, v, z, xs = bk.bucket_health(bucket, states, shards)
            orth_u, orth_v, z_norm = max(orth_u, u), max(orth_v, v), max(z_norm, z)
            x_norms += xs
        return {
            "orth_err_U": orth_u,
            "orth_err_V": orth_v,
            "max_norm_Z": z_norm,
            "mean_norm_X": sum(x_norms) / len(x_norms),
        }


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
