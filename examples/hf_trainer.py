"""Riemannion inside a plain Hugging Face ``Trainer``: SmolLM2-135M-Instruct + LoRA on the
commonsense mixture, LOI initialisation, a stock PEFT adapter at the end. Offline on CPU.

    python examples/hf_trainer.py                       # one process, the whole SmolLM2
    python examples/hf_trainer.py --max-steps 4 --layers 4     # a quick look: 4-layer cut, ~2 min
                                                               # on 2 CPU cores (4 evals of 64)

Two processes, on CPU as here (on GPUs the same lines; drop DS_ACCELERATOR=cpu):

    torchrun --nproc-per-node 2 examples/hf_trainer.py                       # DDP
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py   # DDP
    torchrun --nproc-per-node 2 examples/hf_trainer.py --fsdp                # FSDP2
    accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 examples/hf_trainer.py
    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/hf_trainer.py --zero 2   # ZeRO-2

--fsdp is TrainingArguments(fsdp=True, fsdp_config={"version": 2}) (lora_A sharded along its
input dimension); --zero N is TrainingArguments(deepspeed=...) with no "optimizer" block, so
Riemannion is the optimizer. Without a GPU the script asks for CPU processes itself: `accelerate
launch --cpu` would start ONE process (its simple launcher; it also refuses --cpu with
--use_fsdp), while --multi_gpu / --use_fsdp start the 2 processes on CPUs as well. Add
--max-steps 2 --layers 4 to any line for a quick look.

What differs from a plain Trainer script is marked ``# <- riemann_zero``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments  # noqa: E402

from riemann_zero import assets  # noqa: E402
from riemann_zero.data import Collator, load_examples, tokenize  # noqa: E402
from riemann_zero.hf import Trainer  # noqa: E402  <- riemann_zero


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="runs/hf_trainer")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=None, help="cut SmolLM2 to its first N layers")
    ap.add_argument("--zero", type=int, default=None, help="DeepSpeed ZeRO stage (0-3)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 through accelerate")
    a = ap.parse_args()

    path = assets.smollm2(layers=a.layers)  # the real SmolLM2, from the offline asset cache
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    train = tokenize(load_examples("commonsense", limit=2000), tok, template="chat",
                     max_length=192)
    evals = tokenize(load_examples("commonsense", split="eval", limit=64), tok, template="chat",
                     max_length=192)

    extra = {}
    if a.zero is not None:  # no "optimizer" block: Riemannion is the optimizer
        extra["deepspeed"] = {"zero_optimization": {"stage": a.zero},
                              "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto"}
    if a.fsdp:
        extra.update(fsdp=True, fsdp_config={"version": 2})
    # Build the model before TrainingArguments(deepspeed=ZeRO-3), so LOI sees whole weights.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj",
                                                             "o_proj", "gate_proj", "up_proj",
                                                             "down_proj"]))
    args = TrainingArguments(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, weight_decay=0.00316,  # Riemannion's
        lr_scheduler_type="linear", warmup_steps=10, max_grad_norm=1.0, logging_steps=10,
        eval_strategy="steps", eval_steps=max(1, a.max_steps // 4), save_steps=100,
        save_total_limit=2, report_to=["tensorboard"], use_cpu=a.zero is None and
        not torch.cuda.is_available(), seed=0, **extra)
    trainer = Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=evals,
        data_collator=Collator(tok), processing_class=tok,
        rz_optimizer="riemannion",                       # <- riemann_zero
        rz_optimizer_kwargs={"momentum": 0.9},           # <- riemann_zero
        rz_init="loi", rz_init_kwargs={"batches": 2})    # <- riemann_zero
    trainer.train()
    trainer.save_model(os.path.join(a.output_dir, "adapter"))  # a stock PEFT adapter
    if trainer.is_world_process_zero():
        print(f"trained on {args.world_size} process(es), "
              f"{trainer.accelerator.distributed_type.value}; adapter: "
              f"{os.path.join(a.output_dir, 'adapter')} (load with peft.PeftModel.from_pretrained "
              f"on the original SmolLM2)")


if __name__ == "__main__":
    main()
