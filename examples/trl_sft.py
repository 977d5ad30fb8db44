"""Riemannion inside TRL's ``SFTTrainer``: SmolLM2-135M-Instruct, LoRA from ``peft_config``, the
commonsense mixture as conversational prompt/completion pairs (loss on the completion), LOI
initialisation, a stock PEFT adapter at the end. Offline on CPU.

    pip install 'riemann-zero[trl]'
    python examples/trl_sft.py                                 # one process
    python examples/trl_sft.py --max-steps 2 --layers 4        # a quick look: 4-layer cut, <1 min

Two processes, on CPU as here (on GPUs the same lines; drop DS_ACCELERATOR=cpu):

    torchrun --nproc-per-node 2 examples/trl_sft.py                          # DDP
    accelerate launch --multi_gpu --num_processes 2 examples/trl_sft.py      # DDP
    torchrun --nproc-per-node 2 examples/trl_sft.py --fsdp                   # FSDP2
    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/trl_sft.py --zero 2      # ZeRO-2

(--fsdp and --zero as in examples/hf_trainer.py; add --max-steps 2 --layers 4 for a quick look.)

What differs from a plain TRL script is marked ``# <- riemann_zero``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig  # noqa: E402

from riemann_zero import assets  # noqa: E402
from riemann_zero.data import load_examples  # noqa: E402
from riemann_zero.hf import SFTTrainer  # noqa: E402  <- riemann_zero


def pairs(split: str, limit: int) -> Dataset:
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": ex["instruction"]}],
         "completion": [{"role": "assistant", "content": ex["answer"]}]}
        for ex in load_examples("commonsense", split=split, limit=limit)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="runs/trl_sft")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=None, help="cut SmolLM2 to its first N layers")
    ap.add_argument("--zero", type=int, default=None, help="DeepSpeed ZeRO stage (0-3)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 through accelerate")
    a = ap.parse_args()

    extra = {}
    if a.zero is not None:  # no "optimizer" block: Riemannion is the optimizer
        extra["deepspeed"] = {"zero_optimization": {"stage": a.zero},
                              "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto"}
        if not torch.cuda.is_available():  # DeepSpeed's processes are not use_cpu ones, and
            extra["bf16"] = False          # TrainingArguments refuses TRL's default bf16 there
    if a.fsdp:
        extra.update(fsdp=True, fsdp_config={"version": 2})
    path = assets.smollm2(layers=a.layers)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = SFTConfig(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, weight_decay=0.00316,
        warmup_steps=10, max_length=192, logging_steps=10, eval_strategy="steps",
        eval_steps=max(1, a.max_steps // 4), save_steps=100, save_total_limit=2,
        report_to=["tensorboard"], use_cpu=a.zero is None and not torch.cuda.is_available(),
        seed=0, **extra)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=pairs("train", 2000),
        eval_dataset=pairs("eval", 64), processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"]),
        rz_optimizer="riemannion", rz_optimizer_kwargs={"momentum": 0.9},  # <- riemann_zero
        rz_init="loi", rz_init_kwargs={"batches": 2})                       # <- riemann_zero
    trainer.train()
    trainer.save_model(os.path.join(a.output_dir, "adapter"))  # a stock PEFT adapter
    if trainer.is_world_process_zero():
        print(f"trained on {args.world_size} process(es), "
              f"{trainer.accelerator.distributed_type.value}; adapter: "
              f"{os.path.join(a.output_dir, 'adapter')} (load with peft.PeftModel.from_pretrained "
              f"on the original SmolLM2)")


if __name__ == "__main__":
    main()
