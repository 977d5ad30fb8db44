"""The rank-2r PEFT block layout (docs/design.md §3): conversion keeps X, manifold_points, clear
errors, and the exported adapter reproduces the trained model's logits in stock PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model

import riemann_zero as rz

STOCK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, ids_path, out = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_path)).logits
    assert not any(name.startswith("riemann_zero") for name in sys.modules), "imported riemann_zero"
    torch.save(logits, out)
""")


def stock_peft_logits(base: Path, adapter: Path, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    """Logits of ``base`` + ``adapter`` loaded by stock PEFT in a fresh Python process that never
    imports riemann_zero (it runs from an empty folder and asserts so)."""
    torch.save(ids, tmp / "ids.pt")
    script = tmp / "stock_peft.py"
    script.write_text(STOCK_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, str(script), str(base), str(adapter), str(tmp / "ids.pt"),
                          str(tmp / "logits.pt")], cwd=tmp, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp / "logits.pt")


def test_get_peft_model_layout(tiny_llama):
    model = rz.get_peft_model(tiny_llama(0, torch.float32),
                              LoraConfig(r=3, target_modules=["q_proj", "down_proj"]),
                              init="random", init_scale=0.1)
    ads = rz.find_adapters(model)
    assert sorted(ad.name.split(".")[-1] for ad in ads) == ["down_proj", "q_proj"]
    pts = rz.manifold_points(model)
    for ad in ads:
        assert ad.lora_A.shape == (2 * ad.r, ad.n) and ad.lora_B.shape == (ad.m, 2 * ad.r)
        assert ad.scaling == 1.0
        assert float(ad.lora_B[:, : ad.r].abs().max()) == 0.0  # Z = 0
        u, v, k = ad.lora_B[:, ad.r:], ad.lora_A[: ad.r].mT, ad.lora_A[ad.r:].mT
        eye = torch.eye(ad.r)
        assert float((u.mT @ u - eye).norm()) < 1e-6 and float((v.mT @ v - eye).norm()) < 1e-6
        assert float((pts[ad.name] - u @ k.mT).norm()) < 1e-6
        assert int(torch.linalg.matrix_rank(pts[ad.name])) == ad.r


def test_layout_errors(tiny_llama):
    cfg = LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="but got"):
        rz.get_peft_model(tiny_llama(0, torch.float32), cfg, init="loi")
    with pytest.raises(ValueError, match="use_dora"):
        rz.get_peft_model(tiny_llama(0, torch.float32),
                          LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="target module"):
        rz.get_peft_model(tiny_llama(0, torch.float32), LoraConfig(r=40, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no manifold adapters"):
        rz.find_adapters(peft_get_peft_model(tiny_llama(0, torch.float32), cfg))


def test_convert_keeps_the_stock_adapter_exactly(tiny_llama):
    model = peft_get_peft_model(tiny_llama(1, torch.float64),
                                LoraConfig(r=3, lora_alpha=7, target_modules=["q_proj", "up_proj"]))
    gen = torch.Generator().manual_seed(0)
    before = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            with torch.no_grad():
                mod.lora_B["default"].weight.normal_(generator=gen)
            before[name] = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight
                            * mod.scaling["default"]).detach().clone()
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    logits = model(input_ids=ids).logits.detach()
    rz.convert(model)
    after = rz.manifold_points(model)
    for name, x in before.items():
        assert float((after[name] - x).norm() / x.norm()) < 1e-13
    assert float((model(input_ids=ids).logits - logits).abs().max()) < 1e-12
    assert next(iter(model.peft_config.values())).r == 6
    with pytest.raises(ValueError, match="already"):
        rz.convert(model)


def test_saved_adapter_loads_in_stock_peft_with_same_logits(tiny_llama, tmp_path):
    """Train 3 Riemannion steps (fp32), save_adapter, reload with stock PEFT in a subprocess that
    never imports riemann_zero: logits agree to 1e-5 (fp32 rounding of a re-associated B(Ax))."""
    base_dir = tmp_path / "base"
    tiny_llama(2, torch.float32).save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = rz.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                              LoraConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"]))
    opt = rz.Riemannion(model, lr=0.05, weight_decay=0.01)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 12), generator=gen)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    ids = torch.randint(0, 64, (2, 12), generator=gen)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = model.get_base_model()
        with model.disable_adapter():
            base_logits = plain(input_ids=ids).logits
    assert float((want - base_logits).abs().max()) > 1e-3  # the adapter does something
    out = rz.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3  # Z = 0 is dropped: a plain rank-r LoRA
    got = stock_peft_logits(base_dir, out, ids, tmp_path)
    assert float((got - want).abs().max()) < 1e-5
