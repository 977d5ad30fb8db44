"""GPU kit: the summary of a run, and the BENCHMARKS.md "GPU" section made from its JSON.

    python bench/gpu/report.py OUT_DIR --parts env:ok:3 ...      # check.sh's last step:
                                    # writes OUT_DIR/summary.json, prints summary and section
    python bench/gpu/report.py OUT_DIR                           # print the section
    python bench/gpu/report.py OUT_DIR --update BENCHMARKS.md    # replace the section there
    python bench/gpu/report.py --placeholder --update BENCHMARKS.md   # before any GPU run

The section sits between two marker comments; everything else in the file is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for overhead.markdown

BEGIN = "<!-- gpu-kit:begin (written by bench/gpu/report.py; edit the generator, not this) -->"
END = "<!-- gpu-kit:end -->"
FILES = ("env", "correctness", "driver", "overhead_training", "overhead_optimizer")
BUDGET_S = 480
HOW = ("`bash bench/gpu/check.sh OUT` on the GPU machine with `.whl/` carried "
       "(bench/gpu/README.md), then `python bench/gpu/report.py OUT --update BENCHMARKS.md`.")


def load(out: Path) -> dict:
    """{part: its JSON} for the parts whose file exists and parses (others are absent)."""
    data = {}
    for name in (*FILES, "summary"):
        path = out / f"{name}.json"
        try:
            data[name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return data


def summarize(data: dict, parts: list[str], seconds: float | None) -> dict:
    rows = []
    for item in parts:
        name, status, secs = item.split(":")
        ok = data.get(name, {}).get("ok") if name in ("correctness", "driver") else None
        if status == "ok" and ok is False:
            status = "failed"
        rows.append({"part": name, "status": status, "seconds": int(secs)})
    return {"parts": rows, "seconds": seconds,
            "ok": all(r["status"] in ("ok", "skipped") for r in rows)}


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "—" if x is None else format(x, spec)


def _header(data: dict) -> list[str]:
    env = data.get("env")
    if not env:
        return ["Environment: env.json missing (the env part failed)."]
    v, dev = env["versions"], env["device"]
    lines = []
    if env.get("dry_run"):
        lines.append("**Dry run on the CPU** (tiny sizes; skipped: "
                     f"{', '.join(env['skipped_in_dry_run'])}): a check of the kit, not GPU "
                     "numbers.")
    elif not env.get("cuda_available"):
        lines.append("**No GPU was found on this machine**: the parts that need CUDA failed "
                     "(check.log says how); these are not GPU numbers.")
    smi = (env.get("nvidia_smi") or {}).get("gpus") or [{}]
    lines.append(
        f"**Device:** {dev['name']} ×{dev['count']}"
        + (f", {dev['memory_gib']} GiB" if "memory_gib" in dev else "")
        + (f", driver {smi[0]['driver_version']}" if smi[0].get("driver_version") else "")
        + f"; CUDA {env.get('torch_cuda')}, NCCL {env.get('nccl', '—')}; torch {v['torch']}, "
        f"DeepSpeed {v['deepspeed']}, transformers {v['transformers']}, PEFT {v['peft']}, "
        f"Python {v['python']} ({env['time_utc']} UTC"
        + (f", commit {env['commit'][:10]}" if env.get("commit") else "") + ").")
    return lines


def _parts(summary: dict | None) -> list[str]:
    if not summary:
        return []
    total = summary.get("seconds")
    lines = ["", f"Parts ({total} s in all, budget {BUDGET_S} s):" if total else "Parts:", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['status']} | {r['seconds']} |" for r in summary["parts"]]
    return lines


def _correctness(c: dict | None) -> list[str]:
    if not c:
        return ["", "Correctness: no result."]
    lines = ["", "Correctness on the device against float64 on the CPU (error ≤ tolerance = "
             "10·√N·max(measured sensitivity, u); bench/gpu/correctness.py):", "",
             "| check | what | worst error | its tolerance | step size | ok |",
             "|---|---|---|---|---|---|"]
    if "error" in c and "riemannion" not in c:
        return [*lines[:2], f"failed: {c['error']}"]
    rie = c.get("riemannion", {})
    for step in rie.get("steps", []):
        w = step["worst"]
        lines.append(f"| Riemannion step {step['step']} ({'with' if step['momentum'] else 'no'} "
                     f"momentum) | {rie['adapters']} adapters ({rie['layers']} layers, "
                     f"{rie.get('scale', 'Llama-3-8B shapes')}, r={rie['r']}, "
                     f"{rie['adapter_dtype']} + fp32 masters), worst "
                     f"{w['adapter']} vs {w['reference']} | {_fmt(w['error'])} | "
                     f"{_fmt(w['tol'])} | {_fmt(w['step'], '.3f')} | {step['ok']} |")
    if "error" in rie:
        lines.append(f"| Riemannion | failed | {rie['error']} | | | False |")
    for key, label in (("tensorion", "Tensorion direction"), ("merge", "fixed-rank merge")):
        part = c.get(key, {})
        if "error" in part:
            lines.append(f"| {label} | failed | {part['error']} | | | False |")
            continue
        for row in part.get("rows", []):
            what = "×".join(map(str, row["shape"]))
            if key == "merge":
                what += f", rank {row['rank']} of ranks {row['source_ranks']} (host, fp64)"
            lines.append(f"| {label} | {what} | {_fmt(row['error'])} | {_fmt(row['tol'])} | "
                         f"— | {row['ok']} |")
    return lines


def _driver(d: dict | None) -> list[str]:
    if not d:
        return ["", "Driver: no result."]
    if "error" in d and not d.get("engines"):
        return ["", f"Driver: failed: {d['error']}"]
    cfg = d.get("model", {}).get("config", {})
    lines = ["", f"The driver on one device ({d['steps']} steps, Riemannion + LOI, a random "
             f"Llama of hidden size {cfg.get('hidden_size')} with {cfg.get('num_hidden_layers')} "
             "layers); the exported adapter in stock PEFT on the original base "
             "(bench/gpu/driver.py):", "",
             "| engine | dtype | driver final eval loss | stock PEFT | base alone "
             "| \\|stock − driver\\| | tolerance | ok |", "|---|---|---|---|---|---|---|---|"]
    for name, e in d.get("engines", {}).items():
        if e.get("skipped"):
            lines.append(f"| {name} | skipped: {e['skipped']} | | | | | | |")
            continue
        if "final_eval_loss" not in e or "stock_gap" not in e:
            lines.append(f"| {name} | failed: {e.get('error')} | | | | | | False |")
            continue
        key = e["dtype"]
        lines.append(f"| {name} | {key} | {e['final_eval_loss']:.5f} | "
                     f"{e['stock_' + key]:.5f} | {e['base_' + key]:.5f} | "
                     f"{_fmt(e['stock_gap'])} | {_fmt(e['tol'])} | {e['ok']} |")
    return lines


def _overhead(data: dict) -> list[str]:
    import overhead

    lines = []
    train, opt = data.get("overhead_training"), data.get("overhead_optimizer")
    if train and train.get("training"):
        cfg = train["config"]
        lines += ["", f"Overhead of whole training steps, the paper's protocol "
                  f"((T_Riemannion − T_AdamW)/T_AdamW, minimum over {cfg['repeats']} repeats "
                  f"of {cfg['steps']} steps, every timing between device synchronisations): "
                  f"{cfg['model']} with {cfg['model_layers']} layers in bf16, LoRA on all "
                  f"linear layers, batches {cfg['batches']} × {cfg['seq']} tokens"
                  + ("" if train.get("complete") else " (stopped by its time limit)") + ":",
                  "", overhead.markdown({"training": train["training"]})]
    else:
        lines += ["", "Training-step overhead: no result (check.log says why)."]
    if opt and opt.get("optimizer"):
        lines += ["", f"Optimizer step alone (bench/overhead.py --part optimizer, "
                  f"{opt['config']['layers']} Llama-3-8B layers)"
                  + ("" if opt.get("complete") else " (stopped by its time limit)") + ":", "",
                  overhead.markdown({"optimizer": opt["optimizer"]})]
    else:
        lines += ["", "Optimizer-step overhead: no result (check.log says why)."]
    return lines


def section(data: dict | None) -> str:
    """The Markdown of the "GPU" section, from a run's JSON (None: the placeholder)."""
    lines = [BEGIN, "## GPU", ""]
    if data is None:
        lines += ["No GPU run yet. The kit in bench/gpu/ is ready for one: " + HOW,
                  "It checks Riemannion, Tensorion's direction and the fixed-rank merge on the "
                  "device against float64 references, trains with the driver under ZeRO-2 "
                  "(NCCL, bf16) and FSDP2, reloads the adapter in stock PEFT, and measures the "
                  "overhead on the Llama-3-8B shape; its dry run on the CPU is part of the "
                  "default test suite (tests/test_gpu_kit.py)."]
    else:
        lines += _header(data) + ["", "Produced by " + HOW]
        lines += _parts(data.get("summary")) + _correctness(data.get("correctness"))
        lines += _driver(data.get("driver")) + _overhead(data)
    return "\n".join([*lines, "", END]) + "\n"


def update(path: Path, text: str) -> None:
    """Replace the marked section of ``path`` (or append it if the markers are absent)."""
    old = path.read_text()
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", help="the kit's output folder")
    ap.add_argument("--parts", nargs="*", help="name:status:seconds of each part (check.sh)")
    ap.add_argument("--seconds", type=int, help="the whole run's wall time (check.sh)")
    ap.add_argument("--update", type=Path, metavar="BENCHMARKS.md")
    ap.add_argument("--placeholder", action="store_true", help="the section before any run")
    args = ap.parse_args()
    if args.placeholder:
        text = section(None)
    else:
        if args.out is None or not args.out.is_dir():
            ap.error(f"give the kit's output folder (or --placeholder); {args.out} is not one")
        data = load(args.out)
        if args.parts is not None:
            data["summary"] = summarize(data, args.parts, args.seconds)
            (args.out / "summary.json").write_text(json.dumps(data["summary"], indent=1))
            for row in data["summary"]["parts"]:
                print(f"[summary] {row['part']:20s} {row['status']:8s} {row['seconds']:4d} s")
        text = section(data)
    if args.update:
        update(args.update, text)
        print(f"[report] wrote the GPU section of {args.update}")
    else:
        print(text)
    if args.parts is not None and not data["summary"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
