"""GPU kit, part 1: the manifold algebra on the accelerator against float64 on the CPU.

Each check runs on the device in the precision training uses and is compared with a float64
reference computed on the CPU from exactly the same input values (fp32 masters and bf16 gradients
are exact in float64):

1. **Riemannion**: ``layers`` Llama-3-8B-shaped layers (7 projections, rank r), bf16 adapters with
   fp32 master copies, one batched call per shape and no byte cap (as on a GPU). A warm-up step
   creates the masters; then two steps, the first without and the second with momentum. Every
   adapter is compared with the same step in float64 on the CPU (the package's factored step,
   which the test suite holds to the dense oracle at 1e-10), and the last layer's adapter of each
   shape with m·n ≤ ``dense_max`` also with the dense m×n oracle
   (``reference.riemannion_step``) itself. The reference starts at the device's point and
   follows its own trajectory; the random factor gradients are handed to it in its own gauge.
   The dense oracle forms m×m projectors, so on the GPU run only the 1024×4096 shape is
   affordable on the host; the dry run checks every shape.
2. **Tensorion's direction** (``rz.tensorion_direction``, fp32) against the brute-force LMO
   (``reference.tensor_lmo``: every bipartition of the modes, full SVDs).
3. **The fixed-rank merge** (``rz.merge_adapters(method="fixed_rank")`` of three stock PEFT
   adapters) against the truncated SVD of the dense weighted sum. The merge computes in float64
   on the host by design (its API has no device), so this checks the host's LAPACK path.

Tolerance. A backward-stable computation in unit roundoff u returns f(x + δ) with |δ| ≤ c·u·|x|
elementwise, c ≲ √N for the length-N inner products that dominate (probabilistic rounding
analysis, Higham & Mary 2019); its error is then at most about c·u·κ‖f‖, κ the condition number
of f at x (for the polar factor 1/σ_min, for the truncated SVD 1/(σ_r − σ_{r+1})). Rather than
bound κ, κ·u is measured: s = ‖f(x ⊙ (1 + u·ε)) − f(x)‖ / ‖f(x)‖ with random signs ε, evaluated
by the float64 reference itself. A check passes when

    error ≤ TOL_SAFETY · √N · max(s, u),     N = the longest inner dimension, max(m, n),

TOL_SAFETY = 10 covering the constant factors of the QR/SVD backward-error bounds. A formula
error moves the result by a fraction of the step itself; ``step`` is reported beside every error
so the margin is visible.

    python bench/gpu/correctness.py --out OUT/correctness.json [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import riemann_zero as rz  # noqa: E402

TOL_SAFETY = 10.0
U32 = 2.0**-24
U64 = 2.0**-53
HP = dict(lr=0.05, momentum=0.9, weight_decay=0.1)  # a step of a few % of ‖X‖: a clear signal


class _Factors(nn.Module):
    """The two LoRA factors of one adapted layer, laid out as PEFT holds them."""

    def __init__(self, m: int, n: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, m, bias=False)})
        self.scaling = {"default": 1.0}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _signs(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, t.shape, generator=gen, dtype=t.dtype).mul_(2).sub_(1)


def _perturb(t: torch.Tensor, u: float, gen: torch.Generator) -> torch.Tensor:
    return t * (1 + u * _signs(t, gen))


def _point_gap(u1, k1, u2, k2) -> tuple[float, float]:
    """‖U₁K₁ᵀ − U₂K₂ᵀ‖_F / ‖U₂K₂ᵀ‖_F without forming m×n: QR of [U₁ U₂] (no cancellation)."""
    q, r = torch.linalg.qr(torch.cat([u1, u2], dim=1))
    diff = r @ torch.cat([k1, -k2], dim=1).mT
    ref = r[:, u1.shape[1]:] @ k2.mT
    return float(diff.norm()), float(ref.norm())


def _verdict(err: float, s: float, n: int, u: float) -> dict:
    tol = TOL_SAFETY * math.sqrt(n) * max(s, u)
    return {"error": err, "sensitivity": s, "tol": tol, "ok": bool(err <= tol)}


# ------------------------------------------------------------------------------ Riemannion
def _build(sz: common.Sizes, device: str, dtype: torch.dtype, gen: torch.Generator):
    ads = []
    for layer in range(sz.layers):
        for name, (m, n) in sz.shapes.items():
            holder = _Factors(m, n, 2 * sz.r).to(device=device, dtype=dtype)
            ad = rz.Adapter(f"layers.{layer}.{name}", holder, "default", sz.r, m, n)
            u = torch.linalg.qr(torch.randn(m, sz.r, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(n, sz.r, generator=gen))[0]
            k = v * torch.linspace(1.0, 2.0, sz.r)  # singular values 1..2: a well-posed X
            rz.set_point(ad, u.to(device), v.to(device), k.to(device))
            ads.append(ad)
    return ads


def _masters(opt, ads) -> dict[str, tuple]:
    """{name: (U, V, K)} in float64 on the CPU, from the optimizer's fp32 master copies."""
    state = opt.named_state_dict()
    out = {}
    for ad in ads:
        st = state[ad.name]
        if "master_B" not in st or "master_At" not in st:
            raise RuntimeError(f"the optimizer state of {ad.name} has no master_B/master_At "
                               f"(keys: {sorted(st)}); update bench/gpu/correctness.py to the "
                               f"new names of Riemannion's fp32 masters")
        b, at = st["master_B"].double().cpu(), st["master_At"].double().cpu()
        out[ad.name] = (b[:, ad.r:], at[:, : ad.r], at[:, ad.r:])
    return out


def _grads(ads, gen: torch.Generator) -> dict[str, tuple]:
    """Random bf16 gradients of both factors (the dtype PEFT gives bf16 adapters), as fp64."""
    out = {}
    for ad in ads:
        gb = (1e-3 * torch.randn(ad.lora_B.shape, generator=gen)).to(ad.lora_B.dtype)
        ga = (1e-3 * torch.randn(ad.lora_A.shape, generator=gen)).to(ad.lora_A.dtype)
        ad.lora_B.grad, ad.lora_A.grad = gb.to(ad.lora_B.device), ga.to(ad.lora_A.device)
        out[ad.name] = (gb.double(), ga.double())
    return out


def _in_gauge(grads: tuple, dev_point: tuple, ad) -> tuple:
    """The device's factor gradients in the gauge of the reference adapter ``ad``.

    g_U = G V and g_K = Gᵀ U depend on the signs the SVDs gave the columns of U and V, and the
    two trajectories may pick different ones (X, the step and the momentum do not depend on
    them). Flipping the same columns of the gradients hands the reference exactly the G the
    device was given."""
    u_d, v_d, _ = dev_point
    u_r, v_r = ad.lora_B.detach()[:, ad.r:], ad.lora_A.detach()[: ad.r].mT
    cu, cv = (u_d * u_r).sum(0), (v_d * v_r).sum(0)
    if float(torch.cat([cu, cv]).abs().min()) < 0.9:
        raise RuntimeError(f"{ad.name}: the device's and the reference's bases differ by more "
                           f"than signs (|cos| {float(torch.cat([cu, cv]).abs().min()):.3f})")
    gb, ga = (g.clone() for g in grads)
    gb[:, : ad.r] *= cv.sign()
    ga[ad.r:] *= cu.sign()[:, None]
    return gb, ga


def _cpu_step(ref_ads, ref_opt, inputs: dict, grads: dict, first: bool) -> dict[str, tuple]:
    """One float64 CPU step with the device's gradients; returns {name: (U, K)}.

    The reference starts at the device's point and then follows its own trajectory (its
    momentum is stored in factors of its own point, so it is never moved onto the device's)."""
    for ad in ref_ads:
        if first:
            rz.set_point(ad, *inputs[ad.name])
        ad.lora_B.grad, ad.lora_A.grad = _in_gauge(grads[ad.name], inputs[ad.name], ad)
    ref_opt.step()
    return {ad.name: (ad.lora_B.detach()[:, ad.r:].clone(), ad.lora_A.detach()[ad.r:].mT.clone())
            for ad in ref_ads}


def riemannion(sz: common.Sizes) -> dict:
    ref = common.load_reference()
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if sz.bf16 else torch.float32
    ads = _build(sz, sz.device, dtype, gen)
    opt = rz.Riemannion(ads, **HP)
    opt.bucket_bytes = None  # one call per shape, as on an accelerator (the CPU default caps)
    _grads(ads, gen)
    opt.step()  # warm-up: the fp32 masters are created (and the bf16 point re-factored)
    state = opt.named_state_dict()  # the compared steps start without momentum
    opt.load_named_state_dict({name: {k: v for k, v in st.items()
                                        if not k.startswith("momentum")}
                                 for name, st in state.items()})

    f64 = torch.float64
    ref_ads = [rz.Adapter(ad.name, _Factors(ad.m, ad.n, 2 * ad.r).to(f64), "default", ad.r,
                          ad.m, ad.n) for ad in ads]
    pert_ads = [rz.Adapter(ad.name, _Factors(ad.m, ad.n, 2 * ad.r).to(f64), "default", ad.r,
                           ad.m, ad.n) for ad in ads]
    ref_opt, pert_opt = rz.Riemannion(ref_ads, **HP), rz.Riemannion(pert_ads, **HP)
    last = {}
    for ad in ads:  # the dense oracle: the last layer's adapter of each shape (small enough)
        if ad.m * ad.n <= sz.dense_max:
            last[(ad.m, ad.n)] = ad.name
    dense = set(last.values())
    dense_momentum: dict[str, torch.Tensor | None] = {name: None for name in dense}
    steps, device_s, want = [], [], {}
    for t in range(2):
        inputs = _masters(opt, ads)
        grads = _grads(ads, gen)
        with common.Timer(sz.device) as timer:
            opt.step()
        device_s.append(timer.seconds)
        out = _masters(opt, ads)
        first = t == 0
        before = {k: (v[0], v[2]) for k, v in inputs.items()} if first else want
        want = _cpu_step(ref_ads, ref_opt, inputs, grads, first)
        pgen = torch.Generator().manual_seed(100 + t)
        p_in = {k: tuple(_perturb(x, U32, pgen) for x in v) for k, v in inputs.items()}
        p_gr = {k: tuple(_perturb(x, U32, pgen) for x in v) for k, v in grads.items()}
        pert = _cpu_step(pert_ads, pert_opt, p_in, p_gr, first)
        rows = []
        for ad in ads:
            u1, _, k1 = out[ad.name]
            gap, norm = _point_gap(u1, k1, *want[ad.name])
            p_gap, _ = _point_gap(*pert[ad.name], *want[ad.name])
            step, _ = _point_gap(*before[ad.name], *want[ad.name])
            row = {"adapter": ad.name, "shape": [ad.m, ad.n], "reference": "float64 step (CPU)",
                   "step": step / norm,
                   **_verdict(gap / norm, p_gap / norm, max(ad.m, ad.n), U32)}
            rows.append(row)
            if ad.name in dense:
                rows.append(_dense_row(ref, ad, inputs[ad.name], grads[ad.name], (u1, k1),
                                       dense_momentum, row))
        steps.append({"step": t + 1, "momentum": t > 0, "device_step_s": device_s[-1],
                      "ok": all(r["ok"] for r in rows),
                      "worst": max(rows, key=lambda r: r["error"] / r["tol"]), "rows": rows})
    return {"layers": sz.layers, "r": sz.r, "adapters": len(ads), "scale": sz.scale,
            "adapter_dtype": str(dtype).replace("torch.", ""),
            "master_dtype": "float32", "batched_by_shape": True, "bucket_bytes": None,
            "hyper_parameters": HP, "dense_oracle_adapters": sorted(dense),
            "steps": steps, "ok": all(s["ok"] for s in steps)}


def _dense_row(ref, ad, inputs, grads, got, momentum: dict, factored: dict) -> dict:
    """One adapter's step by the dense m×n oracle; G is the dense matrix the factor gradients
    stand for at this point: G = U g_Kᵀ + (I − UUᵀ) g_U Vᵀ (g_U = G V, g_K = Gᵀ U)."""
    u, v, k = inputs
    gb, ga = grads
    g_u, g_k = gb[:, : ad.r], ga[ad.r:].mT
    g = u @ g_k.mT + (g_u - u @ (u.mT @ g_u)) @ v.mT
    x = u @ k.mT
    bu, bv = torch.linalg.qr(u)[0], torch.linalg.qr(k)[0]  # orthonormal bases of X's spaces
    x_new, _, _, momentum[ad.name] = ref.riemannion_step(
        bu, bv, x, g, momentum[ad.name], lr=HP["lr"], beta=HP["momentum"],
        weight_decay=HP["weight_decay"])
    err = _rel(got[0] @ got[1].mT, x_new)
    return {"adapter": ad.name, "shape": [ad.m, ad.n], "reference": "dense oracle (CPU)",
            "step": _rel(x, x_new),
            **_verdict(err, factored["sensitivity"], max(ad.m, ad.n), U32)}


# ------------------------------------------------------------------------------- Tensorion
def tensorion(sz: common.Sizes) -> dict:
    ref = common.load_reference()
    gen = torch.Generator().manual_seed(1)
    rows = []
    for shape in sz.tensors:
        m = torch.randn(shape, generator=gen)
        with common.Timer(sz.device) as timer:
            d = rz.tensorion_direction(m.to(sz.device))
        d = d.double().cpu()
        d_ref, tau, value = ref.tensor_lmo(m.double())
        d_pert = ref.tensor_lmo(_perturb(m.double(), U32, gen))[0]
        rows_dim = math.prod(shape[i] for i in tau)
        n = max(rows_dim, m.numel() // rows_dim)
        rows.append({"shape": list(shape), "unfolding": list(tau), "device_s": timer.seconds,
                     "dual_norm_gap": abs(float((m.double() * d).sum()) - value) / value,
                     **_verdict(_rel(d, d_ref), _rel(d_pert, d_ref), n, U32)})
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


# ------------------------------------------------------------------------------ merge
def _write_lora(folder: Path, tensors: dict, r: int, alpha: float, targets: list[str]) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
               base_model_name_or_path="gpu-kit/random-llama").save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))


def merge(sz: common.Sizes) -> dict:
    from safetensors.torch import load_file

    ref = common.load_reference()
    gen = torch.Generator().manual_seed(2)
    m, n = sz.merge_shape
    modules = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    ranks, alphas, weights = [sz.r, sz.r, 2 * sz.r], [16.0, 8.0, 32.0], [0.5, 0.3, 0.2]
    rank = sz.r
    sources = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (r, alpha) in enumerate(zip(ranks, alphas)):
            tensors = {}
            for mod in modules:
                key = f"base_model.model.{mod}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, n, generator=gen,
                                                               dtype=torch.float64) / n**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(m, r, generator=gen,
                                                              dtype=torch.float64)
            _write_lora(tmp / f"s{i}", tensors, r, alpha, ["k_proj", "v_proj"])
            sources.append((alpha / r, tensors))
        start = time.perf_counter()
        out = rz.merge_adapters([tmp / f"s{i}" for i in range(3)], tmp / "merged",
                                method="fixed_rank", weights=weights, rank=rank)
        seconds = time.perf_counter() - start
        merged = load_file(str(out / "adapter_model.safetensors"))
    rows = []
    for mod in modules:
        key = f"base_model.model.{mod}"
        got = merged[f"{key}.lora_B.weight"].double() @ merged[f"{key}.lora_A.weight"].double()
        terms = [(w * s, t[f"{key}.lora_B.weight"], t[f"{key}.lora_A.weight"])
                 for w, (s, t) in zip(weights, sources)]
        want = ref.truncate(ref.weighted_sum(terms), rank)
        pert = ref.truncate(ref.weighted_sum([(c, _perturb(b, U64, gen), _perturb(a, U64, gen))
                                              for c, b, a in terms]), rank)
        rows.append({"module": mod, "shape": [m, n], "rank": rank, "source_ranks": ranks,
                     **_verdict(_rel(got, want), _rel(pert, want), max(m, n), U64)})
    return {"device": "cpu (merge_adapters computes in float64 on the host)", "merge_s": seconds,
            "rows": rows, "ok": all(r["ok"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, every dimension / 64")
    args = ap.parse_args()
    sz = common.sizes(args.dry_run)
    result: dict = {"device": sz.device, "dry_run": args.dry_run,
                    "float32_matmul_precision": torch.get_float32_matmul_precision(),
                    "tol_safety": TOL_SAFETY}
    if sz.device == "cuda" and not torch.cuda.is_available():
        result["error"] = "CUDA is not available (on a machine without a GPU use --dry-run)"
        result["ok"] = False
        args.out.write_text(json.dumps(result, indent=1))
        raise SystemExit(result["error"])
    for name, check in (("riemannion", riemannion), ("tensorion", tensorion), ("merge", merge)):
        start = time.perf_counter()
        try:
            result[name] = check(sz)
        except Exception as err:  # one failing check leaves the others' results
            result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()[-3000:]}
        result[name]["seconds"] = time.perf_counter() - start
        print(f"[correctness] {name}: {'ok' if result[name]['ok'] else 'FAILED'} "
              f"({result[name]['seconds']:.1f} s)", flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    result["ok"] = all(result[k]["ok"] for k in ("riemannion", "tensorion", "merge"))
    args.out.write_text(json.dumps(result, indent=1))
    if not result["ok"]:
        raise SystemExit("correctness: some check failed (see the JSON)")


if __name__ == "__main__":
    main()
