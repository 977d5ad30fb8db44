"""One Hugging Face Trainer run with Riemannion on a tiny random Llama, for the tests of
:mod:`riemann_zero.hf` (one process, or several under ``torchrun``; CPU, gloo).

``python tests/hf/hf_worker.py SPEC.json``. The spec says: ``out`` (output_dir), ``steps``,
``per_device`` (micro-batch per rank), ``loi`` (rz_init="loi", else "zero"), ``stage`` (DeepSpeed
ZeRO stage via ``TrainingArguments(deepspeed=...)``, or null for none), ``save_steps`` (0: no
checkpoints), ``kill_at`` (exit the process hard right after the checkpoint of that step),
``resume`` (a checkpoint to resume from). Rank 0 writes ``OUT/result.pt``: the manifold points X
(float64), the logged per-step losses, the manifold-health logs, and the final adapter goes to
``OUT/adapter`` through ``trainer.save_model``.

The data are ``N_SEQ`` fixed random sequences of equal length (no padding), read in order
(``train_sampling_strategy="sequential"``), so a global batch is the same examples at any world
size and the mean of per-rank mean losses is the global mean loss.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

SEQ, VOCAB, N_SEQ = 8, 64, 64
TARGETS = ["q_proj", "v_proj", "down_proj"]
LLAMA = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
             tie_word_embeddings=False)
LR, R = 0.02, 2


def build_peft():
    """A stock PEFT LoRA (rank R, alpha 2R) on the tiny Llama, identical in every process."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA)).float()
    return get_peft_model(base, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0,
                                           target_modules=TARGETS))


def data() -> list[dict]:
    ids = torch.randint(0, VOCAB, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x} for x in ids]


def ds_config(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def main(spec: dict) -> None:
    from transformers import TrainerCallback, TrainingArguments

    import riemann_zero as rz
    from riemann_zero.hf import Trainer

    torch.set_num_threads(1)
    out = Path(spec["out"])
    stage = spec.get("stage")
    extra = {}
    if stage is not None:  # a plain user script: riemann_zero.hf completes the CPU state
        extra = {"deepspeed": ds_config(stage)}
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=spec["per_device"],
        max_steps=spec["steps"], learning_rate=LR, weight_decay=0.01, warmup_steps=1,
        max_grad_norm=1.0, logging_steps=1, report_to=[], disable_tqdm=True,
        train_sampling_strategy="sequential", use_cpu=stage is None,
        save_strategy="steps" if spec.get("save_steps") else "no",
        save_steps=spec.get("save_steps") or 500, seed=0,
        **extra)

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == spec.get("kill_at"):
                os._exit(9)  # no clean-up, as a killed job

    trainer = Trainer(model=build_peft(), args=args, train_dataset=data(), callbacks=[Kill()],
                      rz_init="loi" if spec.get("loi") else "zero",
                      rz_optimizer_kwargs={"momentum": 0.9},
                      rz_init_kwargs={"batches": spec.get("loi_batches", 2), "p": 4})
    trainer.train(resume_from_checkpoint=spec.get("resume"))
    trainer.save_model(str(out / "adapter"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    points = {k: v.double() for k, v in rz.manifold_points(model).items()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if trainer.args.process_index == 0:
        torch.save({"points": points, "losses": [h["loss"] for h in logs],
                    "steps": [h["step"] for h in logs], "logs": logs}, out / "result.pt")


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
