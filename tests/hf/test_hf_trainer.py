"""riemann_zero.hf.Trainer in one process on a tiny random Llama (fp32): the same trajectory as
the plain loop, refusals at construction, stock PEFT adapters relative to the original base, and
an exact resume after a killed run.

Tolerances:
- Trainer vs plain loop: both run the same fp32 operations on the same batches; the only
  differences are summation orders that are not ours (the Trainer's loss is the token sum over
  ``num_items_in_batch`` instead of the model's token mean, and its clipping norm is computed by
  accelerate). Those change gradients by an fp32 ulp or so (~1e-7 relative) and the smooth
  manifold step would carry that through 6 steps to a few 1e-7 (measured: 0, bitwise equal, on
  torch 2.13 CPU); 1e-6 is the issue's
  bound, and a wrong lr, schedule step, missing clip or doubled step moves X by ≥ 1e-2 relative.
- Logits of the saved adapter in stock PEFT vs the trained model: the same ΔW written as other
  factors ([U | B₀][K | −A₀ᵀ]ᵀ after LOI) on the original weight instead of W − ΔW₀ + ΔW, so
  fp32 rounding of W ± ΔW₀ (|W| ~ 0.02·√24, ΔW₀ ~ 1e-2): ≤ 1e-5 of the logits' scale.
- Resume: the resumed run replays the same fp32 operations (same batches, same optimizer state
  read back bit-exactly), so losses and points are equal to 1e-12.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import hf_worker as w  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
           PYTHONWARNINGS="ignore", PYTHONPATH=str(HERE.parents[1]))


def _worker(tmp: Path, env: dict | None = None, **spec) -> subprocess.CompletedProcess:
    path = tmp / f"spec_{abs(hash(json.dumps(spec, sort_keys=True)))}.json"
    path.write_text(json.dumps(spec))
    return subprocess.run([sys.executable, str(HERE / "hf_worker.py"), str(path)],
                          env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _points(model) -> dict[str, torch.Tensor]:
    import riemann_zero as rz

    return {k: v.double() for k, v in rz.manifold_points(model).items()}


def _rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def _trainer(tmp: Path, steps: int, loi: bool, accum: int = 1, **extra):
    from transformers import TrainingArguments

    from riemann_zero.hf import Trainer

    eval_dataset = extra.pop("eval_dataset", None)
    args = TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=4 // accum, max_steps=steps,
        gradient_accumulation_steps=accum, learning_rate=w.LR, weight_decay=0.01,
        warmup_steps=1, max_grad_norm=1.0, logging_steps=1, report_to=[], disable_tqdm=True,
        train_sampling_strategy="sequential", use_cpu=True, seed=0,
        **{"save_strategy": "no", **extra})
    return Trainer(model=w.build_peft(), args=args, train_dataset=w.data(),
                   eval_dataset=eval_dataset, rz_init="loi" if loi else "zero",
                   rz_optimizer_kwargs={"momentum": 0.9}, rz_init_kwargs={"batches": 2, "p": 4})


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_equals_plain_loop(tmp_path, accum):
    """Six Trainer steps (lr, weight decay, linear schedule with warm-up, clipping, gradient
    accumulation all from TrainingArguments) = six steps of rz.Riemannion in a plain loop on the
    same batches (accum = 2: two micro-batches of 2, each loss / 2, one step)."""
    from transformers import get_scheduler

    import riemann_zero as rz
    from riemann_zero.adapters.layout import init_points

    steps = 6
    trainer = _trainer(tmp_path, steps, loi=False, accum=accum)
    trainer.train()
    got = _points(trainer.model)

    model = w.build_peft()
    init_points(rz.convert(model), "zero", seed=0)
    opt = rz.Riemannion(model, lr=w.LR, momentum=0.9, weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=steps)
    items = w.data()
    model.train()
    micro = 4 // accum
    for s in range(steps):
        for j in range(accum):
            first = 4 * s + micro * j
            ids = torch.stack([it["input_ids"] for it in items[first: first + micro]])
            (model(input_ids=ids, labels=ids).loss / accum).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    want = _points(model)
    # it moved: rz_init="zero" starts every X at 0, six steps of lr 0.02 leave each far from it
    assert min(float(v.norm()) for v in want.values()) > 1e-3
    assert _rel(got, want) <= 1e-6
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps and all("manifold/orth_err_U" in h for h in logs)
    assert max(h["manifold/orth_err_U"] for h in logs) < 1e-5  # fp32 orthonormality


def test_refusals_are_one_line_before_any_step(tmp_path):
    """optimizers=(...) with rz_optimizer, a DeepSpeed optimizer block, an unknown optimizer, lr
    in rz_optimizer_kwargs, a launcher's WORLD_SIZE=2 while the Trainer sees one process, bf16
    under ZeRO-0 (DeepSpeed's wrapper would overwrite every manifold step): each
    refused at construction with one line naming the fix (run in a fresh process:
    TrainingArguments(deepspeed=...) changes process-wide state)."""
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(HERE)!r})
        import hf_worker as w
        from transformers import TrainingArguments
        from riemann_zero.hf import Trainer
        def args(**kw):
            return TrainingArguments(output_dir={str(tmp_path)!r}, use_cpu=True, report_to=[],
                                     max_steps=1, **kw)
        ds = {{"zero_optimization": {{"stage": 2}}, "train_micro_batch_size_per_gpu": "auto",
              "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3}}}}}}
        cases = {{
            "optimizers": (dict(args=args()), dict(optimizers=(torch.optim.SGD(
                [torch.nn.Parameter(torch.zeros(1))], lr=1.0), None))),
            "ds_optimizer": (dict(args=args(deepspeed=ds)), {{}}),
            "name": (dict(args=args()), dict(rz_optimizer="adamw")),
            "lr": (dict(args=args()), dict(rz_optimizer_kwargs={{"lr": 1.0}})),
        }}
        cases["world"] = (dict(args=args()), {{}})  # a launcher's 2 processes, 1 seen
        bf16 = {{"zero_optimization": {{"stage": 0}}, "bf16": {{"enabled": True}},
                "train_micro_batch_size_per_gpu": "auto"}}
        cases["bf16_zero0"] = (dict(args=args(deepspeed=bf16)), {{}})
        auto = dict(bf16, bf16={{"enabled": "auto"}})  # resolved from TrainingArguments.bf16
        cases["bf16_auto_zero0"] = (dict(args=args(deepspeed=auto, bf16=True)), {{}})
        for name, (targs, extra) in cases.items():
            model = w.build_peft()
            os.environ["WORLD_SIZE"] = "2" if name == "world" else "1"
            try:
                Trainer(model=model, train_dataset=w.data(), **targs, **extra)
            except ValueError as err:
                print(name + "\\t" + str(err).replace("\\n", "<NL>"))
            else:
                print(name + "\\tNOT REFUSED")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(ln.split("\t", 1) for ln in proc.stdout.splitlines() if "\t" in ln)
    assert set(lines) == {"optimizers", "ds_optimizer", "name", "lr", "world", "bf16_zero0",
                          "bf16_auto_zero0"}
    for msg in lines.values():
        assert "<NL>" not in msg and msg != "NOT REFUSED"
    assert "drop optimizers=" in lines["optimizers"]
    assert "remove the 'optimizer' block" in lines["ds_optimizer"]
    assert "riemannion" in lines["name"]
    assert "learning_rate" in lines["lr"]
    assert "WORLD_SIZE=2" in lines["world"] and "use_cpu=True" in lines["world"]
    for case in ("bf16_zero0", "bf16_auto_zero0"):
        assert "stage=1" in lines[case] and "bf16.enabled=false" in lines[case]


@pytest.mark.parametrize("loi", [False, True])
def test_saved_adapter_reproduces_logits_in_stock_peft(tmp_path, loi):
    """save_model() writes a non-empty stock PEFT adapter; PEFT on the ORIGINAL base, in a process
    that never imports riemann_zero, gives the trained model's logits."""
    from safetensors.torch import load_file

    trainer = _trainer(tmp_path, 3, loi=loi)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.numel() and t.abs().max() > 0 for t in tensors.values())
    ids = torch.randint(0, w.VOCAB, (2, w.SEQ), generator=torch.Generator().manual_seed(5))
    model = trainer.model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM
        from hf_worker import LLAMA
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(**LLAMA)).float()
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        ids = torch.randint(0, {w.VOCAB}, (2, {w.SEQ}), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert "riemann_zero" not in sys.modules
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**ENV, "PYTHONPATH": ""},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    base = w.build_peft().get_base_model().eval()  # the adapter matters: logits moved
    with torch.no_grad():
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-4
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_resume_after_kill_continues_exactly(tmp_path):
    """Kill the process right after the step-3 checkpoint of a 6-step run, resume from it: the
    losses of steps 4–6 and the final points equal the uninterrupted run's, and it was a resume,
    not a restart (which, training being deterministic, would reproduce the same losses):
    - the resumed process logs steps 4–6 only and runs no forward pass of steps 1–3 (its forward
      passes are LOI's calibration passes, then exactly the full run's steps 4–6);
    - its data set differs from the checkpointed run's in the examples of step 3 (LOI calibrates
      on steps 1–2, so the rebuilt start is the same): a run that restarted would train on them
      and leave the uninterrupted trajectory; the resumed one follows the checkpoint's state."""
    common = dict(steps=6, per_device=4, loi=True, save_steps=3)
    full = _worker(tmp_path, out=str(tmp_path / "full"), **common)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _worker(tmp_path, out=str(tmp_path / "cut"), kill_at=3, **common)
    assert killed.returncode == 9, killed.stderr[-3000:]
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").exists() and not (tmp_path / "cut" /
                                                                   "result.pt").exists()
    step3 = [8, 12]  # per_device 4, sequential: step 3 trains on sequences 8..11
    assert all(not torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(w.data()[8:12], w.data(step3)[8:12]))
    resumed = _worker(tmp_path, out=str(tmp_path / "cut"), resume=str(ckpt), swap=step3, **common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(tmp_path / "full" / "result.pt"), torch.load(tmp_path / "cut" / "result.pt")
    # b's log history holds steps 1–3 from the checkpoint's trainer_state.json, then its own
    assert a["steps"] == b["steps"] == list(range(1, 7))
    assert a["logged_here"] == list(range(1, 7)) and b["logged_here"] == [4, 5, 6]
    # the uninterrupted run ends with its 6 steps on sequences 4(s−1)..4s−1 (sequential order)
    steps = [torch.stack([x["input_ids"] for x in w.data()[4 * s: 4 * s + 4]]).tolist()
             for s in range(6)]
    assert a["forwards"][-6:] == steps
    startup = a["forwards"][:-6]  # LOI's calibration passes on the first 2 batches
    assert startup and b["forwards"] == startup + steps[3:]
    assert b["losses"][3:] == pytest.approx(a["losses"][3:], rel=1e-12, abs=0)
    assert a["losses"][3:] != a["losses"][:3]
    assert _rel(b["points"], a["points"]) <= 1e-12


def test_trainer_under_deepspeed_zero1_on_one_process(tmp_path, free_port):
    """The README's one-process DeepSpeed path (``TrainingArguments(deepspeed=...)`` on a CPU
    process, ZeRO-1, with the variables a launcher of one process sets): the Trainer wraps the
    model in DeepSpeed's engine and trains the points of the plain run (RTOL 1e-5 as
    tests/hf/test_hf_deepspeed.py: DeepSpeed's fp32 gradient buffers and clipping sum in another
    order), and the adapter it saves gives the trained model's logits in stock PEFT in a process
    that never imports riemann_zero (1e-5 of the logits' scale, as the test above)."""
    common = dict(steps=4, per_device=4, loi=True)
    plain = _worker(tmp_path, out=str(tmp_path / "plain"), **common)
    assert plain.returncode == 0, plain.stderr[-3000:]
    launcher = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port))
    zero1 = _worker(tmp_path, env=launcher, out=str(tmp_path / "zero1"), stage=1, **common)
    assert zero1.returncode == 0, zero1.stderr[-3000:]
    a = torch.load(tmp_path / "plain" / "result.pt")
    b = torch.load(tmp_path / "zero1" / "result.pt")
    assert b["engine"] == "DeepSpeedEngine" and b["world"] == 1
    assert b["steps"] == [1, 2, 3, 4]
    assert _rel(b["points"], a["points"]) <= 1e-5
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    stock, base = w.stock_peft_logits([tmp_path / "zero1" / "adapter", None],
                                      tmp_path / "logits.pt", ENV)
    trained = b["logits"]
    assert (trained - base).abs().max() > 1e-4  # the adapter changes the logits
    assert (stock - trained).abs().max() <= 1e-5 * trained.abs().max()


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    """load_best_model_at_end loads the best checkpoint's manifold state (with LOI's ΔW₀), not
    its exported adapter (relative to the original base, in other factors): afterwards the points
    are those the model had when that checkpoint was saved, and evaluating gives its eval loss.
    ``greater_is_better=True`` on the eval loss makes the "best" checkpoint an early one, so
    restoring it changes the model (the loss falls during training). Tolerances: the state is
    read back bit-exactly (points 1e-12); the same fp32 forward on the same weights (loss 1e-6)."""
    from transformers import TrainerCallback

    saved = {}

    class Points(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            saved[state.global_step] = _points(model)

    trainer = _trainer(tmp_path, 4, loi=True, eval_dataset=w.data()[:8], eval_strategy="steps",
                       eval_steps=1, save_strategy="steps", save_steps=1,
                       load_best_model_at_end=True, metric_for_best_model="eval_loss",
                       greater_is_better=True)
    trainer.add_callback(Points())
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    best = max(range(len(evals)), key=evals.__getitem__) + 1  # its step
    assert len(evals) == 4 and best < 4, evals
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    assert _rel(_points(trainer.model), saved[best]) <= 1e-12
    assert _rel(saved[4], saved[best]) > 1e-3  # restoring it changed the model
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evals[best - 1], rel=1e-6)
