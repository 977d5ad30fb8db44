"""TRL's SFTTrainer with Riemannion (riemann_zero.hf.SFTTrainer) on the real 4-layer SmolLM2
with commonsense examples (conversational prompt/completion, loss on the completion): LOI from
the train dataloader, 20 steps lower the held-out loss, and the saved adapter loads in stock PEFT
(a process that never imports riemann_zero) and gives the trained model's held-out loss.

Tolerance for that last check: the same ΔW as other factors ([U | B₀][K | −A₀ᵀ]ᵀ) on the original
fp32 weight instead of W − ΔW₀ + ΔW; the loss (~2) agrees to fp32 rounding of those sums through
4 layers, measured ~1e-6 relative; 1e-4 is far below the ≥ 1e-2 a wrong or missing adapter gives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("trl")


def _dataset(split: str, limit: int, seed: int = 0):
    from datasets import Dataset

    from riemann_zero.data import load_examples

    rows = [{"prompt": [{"role": "user", "content": ex["instruction"]}],
             "completion": [{"role": "assistant", "content": ex["answer"]}]}
            for ex in load_examples("commonsense", split=split, limit=limit, seed=seed)]
    return Dataset.from_list(rows)


@pytest.mark.slow
def test_sft_trainer_smollm2_commonsense(smollm2_4l, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from riemann_zero.hf import SFTTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2_4l)
    model = AutoModelForCausalLM.from_pretrained(smollm2_4l, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=20, learning_rate=1e-3,
                     weight_decay=0.00316, warmup_steps=2, per_device_train_batch_size=4,
                     per_device_eval_batch_size=8, max_length=128, logging_steps=1,
                     report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True, seed=0,
                     dataloader_num_workers=0, bf16=False)  # TRL defaults to bf16: fp32 here
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset("train", 160),
                         eval_dataset=_dataset("eval", 16), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"]),
                         rz_init="loi", rz_optimizer_kwargs={"momentum": 0.9},
                         rz_init_kwargs={"batches": 2, "p": 4, "q": 0})
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20
    assert after < before - 0.05, (before, after)  # held-out loss, no dropout, fixed set
    assert sum(losses[-5:]) < sum(losses[:5]), losses  # single batches are noisy: 5-step means
    assert all("manifold/orth_err_U" in h for h in trainer.state.log_history if "loss" in h)

    trainer.save_model(str(tmp_path / "adapter"))
    batch = next(iter(trainer.get_eval_dataloader()))
    keep = ("input_ids", "attention_mask", "labels")
    batch = {k: v for k, v in batch.items() if k in keep}
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        want = float(trainer.model.eval()(**batch).loss)
    script = textwrap.dedent(f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(smollm2_4l)!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            loss = float(model(**batch).loss)
            with model.disable_adapter():
                print("LOSS", loss, float(model(**batch).loss))
        assert "riemann_zero" not in sys.modules
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOSS")][0]
    got, base_loss = map(float, line.split()[1:])
    assert got == pytest.approx(want, rel=1e-4)
    assert abs(base_loss - want) > 1e-2  # the adapter matters
