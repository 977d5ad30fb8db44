"""One Hugging Face Trainer run with Riemannion on a tiny random Llama, for the tests of
:mod:`riemann_zero.hf` (one process, or several under ``torchrun`` / ``accelerate launch``; CPU,
gloo). A plain user script: no accelerate state is configured before ``TrainingArguments``.

``python tests/hf/hf_worker.py SPEC.json``. The spec says: ``out`` (output_dir), ``steps``,
``per_device`` (micro-batch per rank), ``accum`` (gradient accumulation steps, default 1), ``loi``
(rz_init="loi", else "zero"), ``stage`` (DeepSpeed ZeRO stage via
``TrainingArguments(deepspeed=...)``, or null for none), ``fsdp`` (FSDP2 via
``TrainingArguments(fsdp=True, fsdp_config={"version": 2})``), ``save_steps`` (0: no
checkpoints), ``kill_at`` (exit the process hard right after the checkpoint of that step),
``resume`` (a checkpoint to resume from), ``swap`` ([start, stop): those training sequences are
replaced by other random ones, as a data set that changed after a checkpoint). Rank 0 writes
``OUT/result.pt``: the manifold points X (float64), the logged per-step losses, the steps logged
by this process (``logged_here``: a resumed run logs only the steps after its checkpoint), the
input ids of every forward pass of this rank's model (``forwards``, in order: LOI's calibration
passes, then one per micro-batch; a resumed run must not recompute the steps before its
checkpoint), the trained model's logits on :func:`probe_ids` (``logits``, computed in the training
processes), the manifold-health logs, the world size the Trainer saw, the wrapper class of the
model (``model_wrapped``) and the placements of the lora_A parameters; the final adapter goes to
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


def data(swap: tuple[int, int] | None = None) -> list[dict]:
    """The training sequences; ``swap=(start, stop)`` replaces those by other random ones."""
    ids = torch.randint(0, VOCAB, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(1))
    if swap:
        start, stop = swap
        ids[start:stop] = torch.randint(0, VOCAB, (stop - start, SEQ),
                                        generator=torch.Generator().manual_seed(99))
    return [{"input_ids": x, "labels": x} for x in ids]


def probe_ids() -> torch.Tensor:
    """Fixed input ids on which the trained model's and stock PEFT's logits are compared."""
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))


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
    if spec.get("fsdp"):  # FSDP2 through accelerate, on CPU processes as on GPUs
        extra = {"fsdp": True, "fsdp_config": {"version": 2}}
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=spec["per_device"],
        max_steps=spec["steps"], learning_rate=LR, weight_decay=0.01, warmup_steps=1,
        max_grad_norm=1.0, logging_steps=1, report_to=[], disable_tqdm=True,
        train_sampling_strategy="sequential", use_cpu=stage is None,
        gradient_accumulation_steps=spec.get("accum", 1),
        save_strategy="steps" if spec.get("save_steps") else "no",
        save_steps=spec.get("save_steps") or 500, seed=0,
        **extra)

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == spec.get("kill_at"):
                os._exit(9)  # no clean-up, as a killed job

    logged_here = []

    class Logged(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logged_here.append(state.global_step)

    peft_model = build_peft()
    forwards = []  # this rank's forward passes, seen from inside the model (any wrapper; PEFT
    # calls the causal LM's forward() directly, so the hook sits on the decoder it calls)
    peft_model.get_base_model().model.register_forward_pre_hook(
        lambda mod, args, kw: forwards.append(kw["input_ids"].tolist()), with_kwargs=True)
    swap = spec.get("swap")
    trainer = Trainer(model=peft_model, args=args, train_dataset=data(swap),
                      callbacks=[Kill(), Logged()],
                      rz_init="loi" if spec.get("loi") else "zero",
                      rz_optimizer_kwargs={"momentum": 0.9},
                      rz_init_kwargs={"batches": spec.get("loi_batches", 2), "p": 4})
    trainer.train(resume_from_checkpoint=spec.get("resume"))
    trainer.save_model(str(out / "adapter"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    placements = sorted({str(getattr(p, "placements", None)) for n, p in model.named_parameters()
                         if "lora_A" in n})
    points = {k: v.double() for k, v in rz.manifold_points(model).items()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    n_train = len(forwards)
    model.eval()
    with torch.no_grad():  # collective under ZeRO-3 / FSDP2: every rank runs it
        logits = model(input_ids=probe_ids().to(trainer.args.device)).logits.float().cpu()
    if trainer.args.process_index == 0:
        torch.save({"points": points, "losses": [h["loss"] for h in logs],
                    "steps": [h["step"] for h in logs], "logs": logs,
                    "logged_here": logged_here, "forwards": forwards[:n_train],
                    "logits": logits,
                    "world": trainer.args.world_size, "lora_A": placements,
                    "engine": type(trainer.model_wrapped).__name__}, out / "result.pt")


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))


def stock_peft_logits(adapters: list, out: Path, env: dict) -> list[torch.Tensor]:
    """Logits of the tiny Llama with each adapter folder of ``adapters`` (None: the bare base)
    loaded by stock PEFT, in a fresh process that never imports riemann_zero (it asserts so)."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        from hf_worker import LLAMA, probe_ids
        ids = probe_ids()
        out = []
        for path in {[None if a is None else str(a) for a in adapters]!r}:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**LLAMA)).float()
            if path:
                model = PeftModel.from_pretrained(model, path)
            with torch.no_grad():
                out.append(model.eval()(input_ids=ids).logits)
        assert "riemann_zero" not in sys.modules
        torch.save(out, {str(out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": ""},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def launch(tmp: Path, name: str, world: int, env: dict, expect: int = 0,
           accelerate: tuple[str, ...] = (), **spec) -> dict | None:
    """Run this worker on ``spec`` in ``world`` processes (``torchrun`` when > 1, or ``accelerate
    launch`` with the options ``accelerate``) with output folder ``tmp/name``; assert its exit
    status; rank 0's ``result.pt`` (None if it has none)."""
    import socket
    import subprocess

    out = tmp / name
    path = tmp / f"{name}_{abs(hash(json.dumps(spec, sort_keys=True)))}.json"
    path.write_text(json.dumps({"out": str(out), **spec}))
    launcher = [sys.executable]
    if world > 1:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        launcher += (["-m", "accelerate.commands.launch", "--num_processes", str(world),
                      "--main_process_port", str(port), *accelerate] if accelerate else
                     ["-m", "torch.distributed.run", f"--nproc-per-node={world}",
                      f"--master-port={port}"])
    proc = subprocess.run([*launcher, __file__, str(path)], env=env, capture_output=True,
                          text=True, timeout=900)
    if world > 1 and expect:  # torchrun exits 1 and names each child's exit status
        assert proc.returncode == 1 and f"exitcode  : {expect} " in proc.stderr, proc.stderr[-4000:]
    else:
        assert proc.returncode == expect, proc.stderr[-4000:]
    result = out / "result.pt"
    return torch.load(result) if result.exists() else None


def assert_resumed(full: dict, resumed: dict, at: int, total: int) -> None:
    """``resumed`` (rank 0's result of a run resumed from the step-``at`` checkpoint, one
    micro-batch per step) resumed, not restarted: it logged only steps at+1..total, and its forward
    passes are the start-up passes (LOI) followed by exactly the uninterrupted run's last
    total − at micro-batches: none of steps 1..at was recomputed."""
    assert full["logged_here"] == list(range(1, total + 1))
    assert resumed["logged_here"] == list(range(at + 1, total + 1))
    startup = full["forwards"][:-total]
    assert resumed["forwards"] == startup + full["forwards"][-(total - at):]
