"""Adapter merging (docs/design.md §9): LoRA cat / fixed_rank against dense float64 sums, gauge
freedom, OFT/BOFT geodesic and OrthoFuse against the dense SO(b) references, both Cayley
conventions, stock-PEFT loading in a process without riemann_zero, and the one-line refusals.

Tolerances: every source is float64, so exact identities hold to ~1e-10 after a few QR/SVD/solve
steps on tiny matrices; the stock-PEFT logits are float32 (the script loads the base in float32),
so they agree with the float64 prediction to ~1e-4 on logits of size ~1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import BOFTConfig, LoraConfig, OFTConfig, PeftModel, get_peft_model

import riemann_zero as rz
from riemann_zero.manifold import orthogonal as orth
from riemann_zero.manifold import reference as ref
from riemann_zero.manifold.fixed_rank import truncated_sum
from riemann_zero.merge import main as merge_main

EXACT = 1e-9  # float64 identities through a few factorizations of ≤ 48×48 matrices


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_llama) -> Path:
    path = tmp_path_factory.mktemp("merge_base") / "base"
    tiny_llama(0, torch.float64).save_pretrained(path)
    return path


def _load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()


def make_adapter(base_dir: Path, out: Path, config, seed: int, scale: float = 0.3) -> Path:
    """A PEFT adapter of ``config`` on the tiny base with random (non-zero) trainable weights."""
    model = get_peft_model(_load_base(base_dir), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.copy_((1.0 if name.endswith("boft_s") else 0.0) + scale * noise)
    model.save_pretrained(out)
    return out


def lora_deltas(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{module: ΔW} as PEFT itself computes it (get_delta_weight: scaling, rsLoRA, patterns)."""
    model = PeftModel.from_pretrained(_load_base(base_dir), str(adapter))
    return {name: mod.get_delta_weight("default").double()
            for name, mod in model.base_model.model.named_modules()
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})}


def rotations(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{module: the full in×in rotation PEFT applies} of an OFT or BOFT adapter."""
    model = PeftModel.from_pretrained(_load_base(base_dir), str(adapter))
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "oft_R") and "default" in mod.oft_R:
            out[name] = mod.get_delta_weight("default").double()
        elif hasattr(mod, "boft_R") and "default" in mod.boft_R:
            out[name] = mod.get_delta_weight("default")[0].double()
    return out


def merge(sources, out, **kw) -> Path:
    return rz.merge_adapters([str(s) for s in sources], out, **kw)


@pytest.fixture(scope="module")
def loras(base_dir, tmp_path_factory) -> list[Path]:
    """Three LoRA adapters: different ranks, alphas, rsLoRA, a rank pattern, target sets."""
    tmp = tmp_path_factory.mktemp("loras")
    return [
        make_adapter(base_dir, tmp / "a", LoraConfig(r=2, lora_alpha=4, target_modules=[
            "q_proj", "v_proj"]), seed=1),
        make_adapter(base_dir, tmp / "b", LoraConfig(r=3, lora_alpha=5, use_rslora=True,
                                                      rank_pattern={"down_proj": 4},
                                                      target_modules=["v_proj", "down_proj"]),
                     seed=2),
        make_adapter(base_dir, tmp / "c", LoraConfig(r=2, lora_alpha=2, target_modules=[
            "q_proj", "down_proj"]), seed=3),
    ]


def weighted(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict:
    names = set().union(*deltas)
    return {n: sum(w * d[n] for w, d in zip(weights, deltas) if n in d) for n in names}


# ------------------------------------------------------------------------------ maths
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truncated_sum_is_the_dense_truncated_svd(seed):
    gen = torch.Generator().manual_seed(seed)
    m, n, k, r = [(30, 20, 7, 3), (12, 40, 9, 5), (25, 25, 6, 6)][seed]
    left = torch.randn(4, m, k, generator=gen, dtype=torch.float64)
    right = torch.randn(4, n, k, generator=gen, dtype=torch.float64)
    out = truncated_sum(left, right, r)
    for i in range(4):
        z = left[i] @ right[i].mT
        assert torch.allclose((out.U[i] * out.s[i]) @ out.V[i].mT, ref.truncate(z, r), atol=EXACT)
        assert abs(float(out.norm[i] - z.norm())) < EXACT


def test_orthogonal_maps_match_the_dense_references():
    gen = torch.Generator().manual_seed(0)
    s1 = orth.skew(0.4 * torch.randn(5, orth.n_skew(6), generator=gen, dtype=torch.float64))
    s2 = orth.skew(0.4 * torch.randn(5, orth.n_skew(6), generator=gen, dtype=torch.float64))
    r1, r2 = orth.cayley(s1), orth.cayley(s2)
    for i in range(5):
        assert torch.allclose(r1[i], ref.cayley(s1[i]), atol=EXACT)
        assert torch.allclose(orth.cayley_inverse(r1)[i], ref.cayley_inverse(r1[i]), atol=EXACT)
        assert torch.allclose(orth.so_log(r1)[i], ref.logm(r1[i]), atol=1e-8)
        assert torch.allclose(orth.geodesic(r1, r2, 0.3)[i], ref.geodesic(r1[i], r2[i], 0.3),
                              atol=1e-8)
        assert torch.allclose(orth.angles(r1)[i], ref.rotation_angles(r1[i]), atol=EXACT)
    assert torch.allclose(r1.mT @ r1, torch.eye(6, dtype=torch.float64).expand(5, 6, 6),
                          atol=EXACT)
    # PEFT's Neumann series approximates cayley(−S): error shrinks with ‖S‖ like ‖S‖^terms.
    small = 0.02 * s1
    assert torch.allclose(orth.neumann_cayley(small, 40), orth.cayley(-small), atol=EXACT)


# ------------------------------------------------------------------------------ LoRA
def test_cat_is_the_exact_weighted_sum(base_dir, loras, tmp_path):
    weights = [0.7, -0.4, 1.3]
    out = merge(loras, tmp_path / "cat", method="cat", weights=weights)
    want = weighted([lora_deltas(base_dir, s) for s in loras], weights)
    got = lora_deltas(base_dir, out)
    assert set(got) == set(want)  # the union of the target sets; absent modules gave 0
    for name in want:
        assert torch.allclose(got[name], want[name], atol=EXACT), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 2  # Σ rᵢ of the busiest module (down_proj: 4 from b's pattern, 2 c)
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "cat" and record["weights"] == weights


@pytest.mark.parametrize("rank", [1, 3])
def test_fixed_rank_is_the_truncated_svd_of_the_sum(base_dir, loras, tmp_path, rank):
    weights = [0.5, 0.3, 0.2]
    out = merge(loras, tmp_path / "fr", method="fixed_rank", weights=weights, rank=rank)
    want = weighted([lora_deltas(base_dir, s) for s in loras], weights)
    got = lora_deltas(base_dir, out)
    for name in want:
        assert torch.allclose(got[name], ref.truncate(want[name], rank), atol=EXACT), name
    assert json.loads((out / "adapter_config.json").read_text())["r"] == rank


def test_fixed_rank_with_the_full_rank_reproduces_cat(base_dir, loras, tmp_path):
    full = 4 + 2  # Σ rᵢ on down_proj, the largest stack
    a = lora_deltas(base_dir, merge(loras, tmp_path / "fr", method="fixed_rank", rank=full))
    b = lora_deltas(base_dir, merge(loras, tmp_path / "cat", method="cat"))
    for name in b:
        assert torch.allclose(a[name], b[name], atol=EXACT), name


def test_fixed_rank_ignores_refactoring_but_peft_linear_does_not(base_dir, tmp_path):
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])
    a = make_adapter(base_dir, tmp_path / "a", cfg, seed=5)
    b = make_adapter(base_dir, tmp_path / "b", cfg, seed=6)
    # b re-factored as (B S, S⁻¹ A) with a random invertible S: the same ΔW.
    from safetensors.torch import load_file, save_file

    tensors, gen = load_file(str(b / "adapter_model.safetensors")), torch.Generator()
    gen.manual_seed(7)
    for key in [k for k in tensors if ".lora_A." in k]:
        s = torch.randn(3, 3, generator=gen, dtype=torch.float64) + 2 * torch.eye(3)
        bkey = key.replace(".lora_A.", ".lora_B.")
        tensors[bkey] = (tensors[bkey] @ s).contiguous()
        tensors[key] = torch.linalg.solve(s, tensors[key]).contiguous()
    b2 = tmp_path / "b2"
    b2.mkdir()
    (b2 / "adapter_config.json").write_text((b / "adapter_config.json").read_text())
    save_file(tensors, str(b2 / "adapter_model.safetensors"))
    same = lora_deltas(base_dir, b2)
    for name, d in lora_deltas(base_dir, b).items():
        assert torch.allclose(same[name], d, atol=EXACT)  # the re-factoring is exact
    x = lora_deltas(base_dir, merge([a, b], tmp_path / "x", method="fixed_rank"))
    y = lora_deltas(base_dir, merge([a, b2], tmp_path / "y", method="fixed_rank"))
    for name in x:
        assert torch.allclose(x[name], y[name], atol=EXACT), name
    px = lora_deltas(base_dir, merge([a, b], tmp_path / "px", method="peft:linear"))
    py = lora_deltas(base_dir, merge([a, b2], tmp_path / "py", method="peft:linear"))
    gap = max(float((px[n] - py[n]).norm() / px[n].norm()) for n in px)
    assert gap > 1e-3  # PEFT's factor-space average depends on the factoring


def test_fixed_rank_equals_peft_svd_without_the_dense_matrices(base_dir, loras, tmp_path):
    """Both are the best rank-R approximation of Σ wᵢ ΔWᵢ; PEFT forms every m×n ΔW for it."""
    kw = {"weights": [0.6, 0.4], "rank": 2}
    ours = lora_deltas(base_dir, merge(loras[:2], tmp_path / "fr", method="fixed_rank", **kw))
    peft = lora_deltas(base_dir, merge(loras[:2], tmp_path / "ps", method="peft:svd", **kw))
    for name in ours:
        assert torch.allclose(ours[name], peft[name], atol=EXACT), name


def test_lora_spectra_restoration_follows_its_rule(base_dir, loras, tmp_path):
    a, b = loras[0], loras[2]  # both hold q_proj
    plain = lora_deltas(base_dir, merge([a, b], tmp_path / "p", method="fixed_rank", rank=4))
    rest = lora_deltas(base_dir, merge([a, b], tmp_path / "r", method="fixed_rank", rank=4,
                                       restore="spectra"))
    da, db = lora_deltas(base_dir, a), lora_deltas(base_dir, b)
    for name in plain:
        total = 0.5 * da.get(name, 0 * plain[name]) + 0.5 * db.get(name, 0 * plain[name])
        sizes = sum(0.5 * d[name].norm() for d in (da, db) if name in d)
        c = max(1.0, float(sizes / total.norm()))
        assert torch.allclose(rest[name], c * plain[name], atol=EXACT), name
        if name in da and name in db:
            assert c > 1.05  # two unrelated random updates: averaging shrank the sum


# ------------------------------------------------------------------------------ OFT / BOFT
def oft(base_dir, out, seed, neumann=False, scale=0.15):
    cfg = OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"],
                    use_cayley_neumann=neumann)
    return make_adapter(base_dir, out, cfg, seed=seed, scale=scale)


def blocks(rot: torch.Tensor, b: int) -> torch.Tensor:
    return torch.stack([rot[i:i + b, i:i + b] for i in range(0, rot.shape[0], b)])


@pytest.fixture(scope="module")
def ofts(base_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ofts")
    return oft(base_dir, tmp / "a", 11), oft(base_dir, tmp / "b", 12)


@pytest.mark.parametrize("method", ["geodesic", "orthofuse"])
@pytest.mark.parametrize("restore", ["none", "spectra"])
def test_t0_and_t1_reproduce_the_sources(base_dir, ofts, tmp_path, method, restore):
    for t, src in [(0.0, ofts[0]), (1.0, ofts[1])]:
        out = merge(ofts, tmp_path / f"m{t}", method=method, t=t, restore=restore)
        got, want = rotations(base_dir, out), rotations(base_dir, src)
        for name in want:
            assert torch.allclose(got[name], want[name], atol=EXACT), (name, t)
        assert json.loads((out / "adapter_config.json").read_text())["use_cayley_neumann"] is False


def test_geodesic_midpoint_is_r1_times_the_root(base_dir, ofts, tmp_path):
    out = merge(ofts, tmp_path / "mid", method="geodesic", t=0.5)
    got, r1, r2 = (rotations(base_dir, p) for p in (out, *ofts))
    for name in got:
        for g, a, b in zip(blocks(got[name], 8), blocks(r1[name], 8), blocks(r2[name], 8)):
            assert torch.allclose(g, a @ ref.sqrtm(a.mT @ b), atol=1e-8), name


@pytest.mark.parametrize("method", ["geodesic", "orthofuse"])
def test_spectra_restoration_scales_the_angles_as_the_formula_says(base_dir, ofts, tmp_path,
                                                                   method):
    t = 0.3
    plain = rotations(base_dir, merge(ofts, tmp_path / "p", method=method, t=t))
    rest = rotations(base_dir, merge(ofts, tmp_path / "r", method=method, t=t,
                                     restore="spectra"))
    c = 1 + 4 * t * (1 - t)
    for name in plain:
        for p, r in zip(blocks(plain[name], 8), blocks(rest[name], 8)):
            th, th2 = ref.rotation_angles(p), ref.rotation_angles(r)
            assert torch.allclose(torch.tan(th2 / 2), c * torch.tan(th / 2), atol=1e-8), name
            assert float(th2.abs().max()) > 1.2 * float(th.abs().max())  # it did something


def test_orthofuse_is_the_cayley_interpolation(base_dir, ofts, tmp_path):
    t = 0.6
    got = rotations(base_dir, merge(ofts, tmp_path / "of", method="orthofuse", t=t))
    r1, r2 = rotations(base_dir, ofts[0]), rotations(base_dir, ofts[1])
    for name in got:
        for g, a, b in zip(blocks(got[name], 8), blocks(r1[name], 8), blocks(r2[name], 8)):
            s = (1 - t) * ref.cayley_inverse(a) + t * ref.cayley_inverse(b)
            assert torch.allclose(g, ref.cayley(s), atol=EXACT), name


def test_neumann_adapter_merged_with_itself_gives_back_its_rotations(base_dir, tmp_path):
    from safetensors.torch import load_file

    src = oft(base_dir, tmp_path / "n", 21, neumann=True, scale=0.01)
    peft_rot = rotations(base_dir, src)  # PEFT's own truncated series
    stored = load_file(str(src / "adapter_model.safetensors"))
    for method in ("geodesic", "orthofuse"):
        got = rotations(base_dir, merge([src, src], tmp_path / method, method=method, t=0.37))
        for name in got:  # written in the exact form
            vec = stored[f"base_model.model.{name}.oft_R.weight"]
            # PEFT's 5-term series stops at S⁴ (coefficient 1 instead of 2, then 2S⁵ + …):
            # |error| ≤ ‖S‖⁴ (1 + 2‖S‖/(1 − ‖S‖)) in the spectral norm
            norm = float(torch.linalg.matrix_norm(orth.skew(vec), ord=2).max())
            bound = norm**4 * (1 + 2 * norm / (1 - norm))
            assert float((got[name] - peft_rot[name]).abs().max()) <= bound, name
            want = orth.cayley(-orth.skew(vec))
            assert torch.allclose(blocks(got[name], 8), want, atol=EXACT), name
            # ... and not what reading it in the exact convention would give (≈ the inverse)
            misread = orth.cayley(orth.skew(vec))
            assert float((blocks(got[name], 8) - misread).abs().max()) > 1e-3, name


def test_boft_factor_by_factor(base_dir, tmp_path):
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"])
    a = make_adapter(base_dir, tmp_path / "a", cfg, seed=31, scale=0.2)
    b = make_adapter(base_dir, tmp_path / "b", cfg, seed=32, scale=0.2)
    for t, src in [(0.0, a), (1.0, b)]:
        got = rotations(base_dir, merge([a, b], tmp_path / f"t{t}", method="geodesic", t=t))
        want = rotations(base_dir, src)
        for name in want:
            assert torch.allclose(got[name], want[name], atol=EXACT)
    out = merge([a, b], tmp_path / "mid", method="orthofuse", t=0.25, restore="spectra")
    from safetensors.torch import load_file

    ta, tb, to = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b, out))
    for key in to:
        if key.endswith("boft_s"):
            assert torch.allclose(to[key], 0.75 * ta[key] + 0.25 * tb[key], atol=EXACT)
        else:
            sa, sb = 0.5 * (ta[key] - ta[key].mT), 0.5 * (tb[key] - tb[key].mT)
            want = (1 + 4 * 0.25 * 0.75) * (0.75 * sa + 0.25 * sb)
            assert torch.allclose(to[key], want, atol=EXACT)


# ------------------------------------------------------------------------------ stock PEFT
STOCK = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, jobs = sys.argv[1], json.loads(sys.argv[2])
    ids = torch.arange(2, 14).view(2, 6)
    for adapter, out in jobs:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapter).eval()
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, out)
    assert not any(n.startswith("riemann_zero") for n in sys.modules), "imported riemann_zero"
""")


def _predicted_logits(base_dir: Path, edit) -> torch.Tensor:
    model = _load_base(base_dir)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(edit(name, mod.weight.double()))
        return model(input_ids=torch.arange(2, 14).view(2, 6)).logits


def test_outputs_load_in_stock_peft_with_the_predicted_logits(base_dir, loras, ofts, tmp_path):
    weights = [0.6, 0.4]
    da, db = lora_deltas(base_dir, loras[0]), lora_deltas(base_dir, loras[1])
    r1, r2 = rotations(base_dir, ofts[0]), rotations(base_dir, ofts[1])
    want_sum = weighted([da, db], weights)
    t = 0.4
    cases = {
        "cat": (merge(loras[:2], tmp_path / "cat", method="cat", weights=weights),
                lambda n, w: w + want_sum.get(n, 0 * w)),
        "fixed_rank": (merge(loras[:2], tmp_path / "fr", method="fixed_rank", weights=weights,
                             rank=2),
                       lambda n, w: w + (ref.truncate(want_sum[n], 2) if n in want_sum else 0)),
        "orthofuse": (merge(ofts, tmp_path / "of", method="orthofuse", t=t),
                      lambda n, w: w @ _cayley_mix(r1[n], r2[n], t).mT if n in r1 else w),
    }
    jobs = [(str(path), str(tmp_path / f"{k}.pt")) for k, (path, _) in cases.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)
    (tmp_path / "stock.py").write_text(STOCK)
    run = subprocess.run([sys.executable, "stock.py", str(base_dir), json.dumps(jobs)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for key, (_, edit) in cases.items():
        got = torch.load(tmp_path / f"{key}.pt").double()
        want = _predicted_logits(base_dir, lambda n, w, e=edit: e(n, w))
        assert float((got - want).abs().max()) < 1e-4, key  # float32 forward vs float64


def _cayley_mix(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Block-diagonal cayley((1 − t) S₁ + t S₂) of two full block-diagonal rotations."""
    out = torch.zeros_like(a)
    for i in range(0, a.shape[0], 8):
        sa = ref.cayley_inverse(a[i:i + 8, i:i + 8])
        sb = ref.cayley_inverse(b[i:i + 8, i:i + 8])
        out[i:i + 8, i:i + 8] = ref.cayley((1 - t) * sa + t * sb)
    return out


# ------------------------------------------------------------------------------ bad input
def test_bad_requests_give_one_line_each(base_dir, loras, ofts, tmp_path, capsys):
    other = tmp_path / "other_base"
    other.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (other / f).write_bytes((loras[1] / f).read_bytes())
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/somewhere/else"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    a, b = str(loras[0]), str(loras[1])
    out = str(tmp_path / "out")
    cases = [
        ([a, str(other), "--out", out, "--method", "fixed_rank"], "different base models"),
        ([a, str(ofts[0]), "--out", out, "--method", "fixed_rank"], "different types"),
        ([a, b, "--out", out, "--method", "cat", "--weights", "1", "2", "3"],
         "one weight per source"),
        ([a, b, "--out", out, "--method", "fixed_rank", "--rank", "0"], "positive integer"),
        ([a, b, "--out", out, "--method", "orthofuse"], "use --method fixed_rank"),
        ([str(ofts[0]), str(ofts[1]), "--out", out, "--method", "fixed_rank"],
         "use --method geodesic or orthofuse"),
        ([str(ofts[0]), str(ofts[1]), "--out", out, "--method", "geodesic", "--t", "1.5"],
         "must be in [0, 1]"),
        ([a, b, "--out", str(busy), "--method", "fixed_rank"], "choose a new folder"),
        ([a, b, "--out", out, "--method", "fixd_rank"], "did you mean 'fixed_rank'"),
    ]
    for argv, needle in cases:
        assert merge_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    assert not (tmp_path / "out").exists()
    assert (busy / "notes.txt").read_text() == "keep me"


def test_cli_writes_and_replaces_its_own_output(base_dir, loras, tmp_path, capsys):
    out = tmp_path / "m"
    argv = [str(loras[0]), str(loras[2]), "--out", str(out), "--method", "fixed_rank"]
    assert merge_main(argv) == 0
    assert merge_main([*argv[:-1], "cat"]) == 0  # an earlier merge output is replaced
    assert json.loads((out / "merge.json").read_text())["method"] == "cat"
    assert not list(tmp_path.glob("m.*"))  # no temporary folder left behind


# ------------------------------------------------------------------------------ eval stage
@pytest.mark.slow
def test_eval_stage_runs_on_a_merged_adapter(smollm2_4l, tmp_path):
    """`python -m eval` on a fixed_rank merge of two LoRA adapters of the real 4-layer SmolLM2."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    from transformers import AutoModelForCausalLM

    srcs = []
    for seed in (1, 2):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_4l), cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(0.01 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(tmp_path / f"s{seed}")
        srcs.append(tmp_path / f"s{seed}")
    out = merge(srcs, tmp_path / "merged", method="fixed_rank")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "eval", str(out), "--suite", "commonsense",
                          "--tasks", "rz_ll_piqa", "--limit", "4", "--no-base",
                          "--output-dir", str(tmp_path / "ev")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert "rz_ll_piqa" in json.dumps(results)
