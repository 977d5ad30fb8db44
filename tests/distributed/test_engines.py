"""ZeRO-1/2/3 and FSDP2 runs of Riemannion (CPU, gloo, several processes) equal the
single-process run, with and without gradient accumulation and LOI, also where ranks own no
column of lora_A (n < world); a ZeRO-3 adapter loads in stock PEFT; every rank's optimizer bytes
per step are what the shapes (and, under ZeRO-1/2, its fragments) predict.

Tolerance: every case trains in fp32 for 5 steps. The engines average gradients in a different
order than the single process sums them (all-reduce / reduce-scatter of per-rank means, micro-batch
accumulation), which changes the fp32 gradients by ~1e-7 relative; the step is smooth in the
gradient (polar factor of a well-separated spectrum, SVD truncation), so the points differ by a few
1e-7 after 5 steps (measured ≤ 8e-7; LOI ≤ 2e-6, its randomized SVD re-orthonormalises fp32
sketches). RTOL = 1e-5 is ten times that, and far below the ~1 relative change a wrong layout,
a lost boundary row or a doubled step gives (a gradient step with lr 0.02 moves X by ~10 %).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from riemann_zero.sharding.accounting import step_bytes

WORKER = Path(__file__).with_name("worker.py")
sys.path.insert(0, str(WORKER.parent))
import worker  # noqa: E402

RTOL = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    return env


def run_spec(tmp: Path, port: int, world: int, cases: list[dict], **extra) -> Path:
    """Run the reference and the multi-process cases; return the output folder."""
    out = tmp / f"w{world}"
    spec = {"world": world, "steps": 5, "r": 2, "port": port, "out": str(out), "cases": cases,
            **extra}
    path = tmp / f"spec_w{world}.json"
    path.write_text(json.dumps(spec))
    for args in (["--reference"], []):
        proc = subprocess.run([sys.executable, str(WORKER), str(path), *args], env=_env(),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def rel_err(out: Path, case: dict) -> float:
    ref = torch.load(out / "reference.pt")[worker.ref_key(case)]["points"]
    got = torch.load(out / f"{case['name']}.pt")["points"]
    assert set(got) == set(ref)
    return max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


def _shapes(case: dict | None = None) -> list[tuple[int, int, int]]:
    """(m, n, r) of the case's worker model's adapters, in module order."""
    r, llama = worker.model_of(case or {}, {"r": 2})
    cfg = {**worker.LLAMA, **llama}
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    per_layer = [(h, h, r), (kv, h, r), (kv, h, r), (h, inter, r)]  # q, k, v, down
    return per_layer * cfg["num_hidden_layers"]


LAYOUT = {"zero1": "zero12", "zero2": "zero12", "zero3": "zero3", "fsdp2": "fsdp2"}


def assert_bytes_as_predicted(out: Path, case: dict, world: int) -> None:
    """Every rank's measured bytes by collective, at every step, equal the prediction for that
    rank (integers: exact); ZeRO-1/2 from the rank's own fragments (DeepSpeed's flat layout)."""
    res = torch.load(out / f"{case['name']}.pt")
    layout, shapes = LAYOUT[case["engine"]], _shapes(case)
    assert len(res["comm_by_rank"]) == world
    for rank, (comm, frags) in enumerate(zip(res["comm_by_rank"], res["fragments_by_rank"])):
        predicted = dict(step_bytes(shapes, layout, world, rank,
                                    frags if layout == "zero12" else None))
        for step in comm:
            assert step == predicted, (rank, step, predicted)
        # Exactly one manifold step per optimizer step (gas = 4 too), as the optimizer counted
        # them (the worker records one entry per optimizer step whatever the optimizer did): 5
        # steps for every adapter, and the bytes it summed over the run are 5 steps' bytes.
        steps = res["adapter_steps_by_rank"][rank]
        assert len(steps) == len(shapes) and set(steps.values()) == {5}, (rank, steps)
        total = res["comm_total_by_rank"][rank]
        assert total == {k: 5 * v for k, v in predicted.items()}, (rank, total)


# World 3: uneven splits everywhere, k/v lora_B (4 rows) leave FSDP2 rank 2 empty, ZeRO-3 cuts
# their rows mid-row (boundary rows in the exchange), ZeRO-1/2 leave most adapters wholly on one
# rank, and FSDP2 keeps down_proj's lora_A (n = 40, 3 ∤ 40) on Shard(0) (transposed by the
# exchange).
W3_DEFAULT = [
    {"name": "zero1", "engine": "zero1"},
    {"name": "zero2_gas4", "engine": "zero2", "gas": 4},
    {"name": "zero3_gas4", "engine": "zero3", "gas": 4},
    {"name": "fsdp2_gas4", "engine": "fsdp2", "gas": 4},
]
# Regression for ranks that own no column of lora_A (n < world) and hold empty fragments: the
# 2-wide Llama of worker.NARROW (r = 1) under ZeRO-3 with gradient accumulation; its ZeRO-1/2
# and FSDP2 twins run in the slow full matrix.
NARROW_CASE = {"name": "narrow_zero3_gas4", "engine": "zero3", "gas": 4, "model": "narrow"}
SHIFT_CASE = {"name": "zero3_shift", "engine": "zero3_shift"}
W2_DEFAULT = [
    {"name": "zero3_loi", "engine": "zero3", "loi": True, "save": True},
    {"name": "fsdp2_loi", "engine": "fsdp2", "loi": True},
]


# Partitioned loading (the driver's model.partitioned_load): each rank reads only its part of the
# saved base, then LOI runs on the partitioned model and 5 steps follow (gas 1).
PARTITIONED = [
    {"name": "zero3_pload_loi", "engine": "zero3", "loi": True, "partitioned": True},
    {"name": "fsdp2_pload_loi", "engine": "fsdp2", "loi": True, "partitioned": True},
]


@pytest.fixture(scope="module")
def world3(tmp_path_factory) -> Path:
    return run_spec(tmp_path_factory.mktemp("w3"), _free_port(), 3,
                    W3_DEFAULT + [NARROW_CASE, SHIFT_CASE] + PARTITIONED)


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> Path:
    return run_spec(tmp_path_factory.mktemp("w2"), _free_port(), 2, W2_DEFAULT + PARTITIONED,
                    save_reference=True)


def test_loi_shift_on_zero3_partitioned_weights(world3):
    """LOI's W − B₀A₀ applied chunk by chunk to ZeRO-3 partitions (world 3: uneven chunks that
    cut rows) equals the shift of the whole weight."""
    res = torch.load(world3 / "zero3_shift.pt")
    assert res["partitioned"]
    # The same fp32 subtraction, chunk-wise vs whole: only the product's summation order may
    # differ (r = 2 terms), so entries agree to a few fp32 ulps of |W − B₀A₀| ≲ 10.
    assert res["shift_err"] <= 1e-5


@pytest.mark.parametrize("case", W3_DEFAULT + [NARROW_CASE], ids=lambda c: c["name"])
def test_world3_equals_single_process(world3, case):
    assert rel_err(world3, case) <= RTOL


@pytest.mark.parametrize("case", W2_DEFAULT, ids=lambda c: c["name"])
def test_world2_loi_equals_single_process(world2, case):
    assert rel_err(world2, case) <= RTOL


@pytest.mark.parametrize("world", ["world2", "world3"])
@pytest.mark.parametrize("case", PARTITIONED, ids=lambda c: c["name"])
def test_partitioned_load_loi_equals_single_process(request, world, case):
    """LOI run after partitioned loading (ZeRO-3 zero.Init / FSDP2 meta device, LOI through the
    engine's gathers with no parameter gradient) gives the single-process LOI on the whole model,
    the same loss at step 0, and the same points after 5 steps (so LOI left nothing in the
    engine's gradient buffers: a stray gradient would move the first step by ~10 %). Tolerance:
    RTOL as the other LOI cases; the step-0 loss differs only through ΔW₀ (|α| = 0.007 times
    rotations that agree to ~1e-6), so 1e-6 relative."""
    out = request.getfixturevalue(world)
    assert rel_err(out, case) <= RTOL
    got = torch.load(out / f"{case['name']}.pt")["loss_step0"]
    want = torch.load(out / "reference.pt")[worker.ref_key(case)]["loss_step0"]
    assert abs(got - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("world", ["world2", "world3"])
@pytest.mark.parametrize("name", [c["name"] for c in PARTITIONED])
def test_partitioned_load_equals_whole_load(request, world, name):
    """Every weight read slice by slice equals the whole model's exactly (a copy, no arithmetic),
    and the loaded model's logits equal the whole model's (the same fp32 products on the same
    values; 1e-6 of the largest logit for summation order inside the engines' matmuls)."""
    res = torch.load(request.getfixturevalue(world) / f"{name}.pt")
    assert res["weights_err"] == 0.0
    want = res["whole_logits"]
    assert (res["logits"] - want).abs().max() <= 1e-6 * want.abs().max()


def test_zero3_partitioned_load_holds_only_chunks(world3):
    """Under zero.Init no base weight is ever whole on a rank: right after loading each holds
    ceil(numel / 3) elements (uneven chunks at world 3) and no full tensor."""
    chunks = torch.load(world3 / "zero3_pload_loi.pt")["chunks"]
    assert chunks
    for name, (held, whole_data, numel) in chunks.items():
        assert held == -(-numel // 3), name
        assert whole_data == 0, name


def test_layouts_detected(world3):
    layouts = {c["name"]: torch.load(world3 / f"{c['name']}.pt")["layout"] for c in W3_DEFAULT}
    assert layouts == {"zero1": "ZeroFlatShards", "zero2_gas4": "ZeroFlatShards",
                       "zero3_gas4": "Zero3Shards", "fsdp2_gas4": "FsdpShards"}


@pytest.mark.parametrize("case", W3_DEFAULT + [NARROW_CASE], ids=lambda c: c["name"])
def test_step_bytes_match_shape_prediction(world3, case):
    """Measured bytes by collective, every step and every rank, equal the count predicted from
    the shapes (and, for ZeRO-1/2, the rank's fragments); the prediction has no term in m·n, so
    no collective grows with a full matrix, and the exchange's share falls with the world."""
    assert_bytes_as_predicted(world3, case, 3)
    layout = LAYOUT[case["engine"]]
    if layout == "zero12":  # uneven flat cuts: some rank holds no element of some lora_A
        frags = torch.load(world3 / f"{case['name']}.pt")["fragments_by_rank"]
        assert any(fa[1] == 0 for per_rank in frags for fa, _ in per_rank)
        return
    predicted = step_bytes(_shapes(case), layout, 3)
    bigger = [(m * 10, n * 10, r) for m, n, r in _shapes(case)]  # 100× m·n → at most 10× bytes
    assert sum(step_bytes(bigger, layout, 3).values()) <= 10 * sum(predicted.values())
    if layout == "zero3":
        exchange = [sum(step_bytes(bigger, layout, w, p)["all_to_all.exchange"]
                        for p in range(w)) / w for w in (3, 12)]
        assert exchange[1] < exchange[0] / 3  # mean bytes per rank ∝ 1 / world


def test_zero3_adapter_loads_in_stock_peft(world2, tmp_path):
    """The adapter saved from the 2-rank ZeRO-3 (LOI) run is non-empty, has the PEFT shapes, and
    stock PEFT on the ORIGINAL base, in a process that never imports riemann_zero, gives the
    logits of the TRAINED model (computed by the 2 ranks right after training, on the LOI-shifted
    base with its manifold adapters) and of the 1-process run's adapter; the adapter changes
    the base's logits. Tolerance: rtol as the points, 1e-5, on logits of size ~1 (the export
    writes the same ΔW in other factors on the unshifted base: fp32 rounding of W ± ΔW₀)."""
    from safetensors.torch import load_file

    saved = world2 / "zero3_loi_adapter"
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    shapes = dict(zip(["q_proj", "k_proj", "v_proj", "down_proj"], _shapes()))
    assert len(tensors) == 2 * len(_shapes())
    for key, t in tensors.items():  # rank 2r = 4 after LOI: [U | B₀] [K | −A₀ᵀ]ᵀ
        m, n, _ = shapes[key.split(".")[-3]]
        assert tuple(t.shape) == ((4, n) if "lora_A" in key else (m, 4)), key
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(WORKER.parent)!r})
        from worker import LLAMA, probe_ids
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        assert "riemann_zero" not in sys.modules
        ids = probe_ids()
        out = []
        for path in ({str(saved)!r}, {str(world2 / "reference_loi1_adapter")!r}, None):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**LLAMA)).float()
            if path:
                model = PeftModel.from_pretrained(model, path)
            with torch.no_grad():
                out.append(model.eval()(input_ids=ids).logits)
        assert "riemann_zero" not in sys.modules
        torch.save(out, {str(tmp_path / "logits.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_logits, ref_logits, base_logits = torch.load(tmp_path / "logits.pt")
    trained = torch.load(world2 / "zero3_loi.pt")["logits"]
    assert (trained - base_logits).abs().max() > 1e-4  # the adapter changes the logits
    assert (dist_logits - trained).abs().max() <= RTOL * trained.abs().max()
    assert (dist_logits - ref_logits).abs().max() <= RTOL * ref_logits.abs().max()


# --------------------------------------------------------------------------- full matrix
FULL = [
    {"name": f"{eng}_gas{gas}{'_loi' if loi else ''}", "engine": eng, "gas": gas, "loi": loi}
    for eng in ("zero1", "zero2", "zero3", "fsdp2") for gas in (1, 4) for loi in (False, True)
] + [{"name": f"narrow_{eng}", "engine": eng, "model": "narrow"}
     for eng in ("zero1", "zero2", "fsdp2")]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_full_matrix(world, tmp_path):
    """Both world sizes × 4 engines × gradient accumulation 1/4 × LOI on/off, and the 2-wide
    model (n < world at world 3) under ZeRO-1/2 and FSDP2; every rank's bytes as predicted."""
    cases = FULL
    out = run_spec(tmp_path, _free_port(), world, cases)
    errors = {c["name"]: rel_err(out, c) for c in cases}
    assert max(errors.values()) <= RTOL, errors
    for case in cases:
        assert_bytes_as_predicted(out, case, world)
