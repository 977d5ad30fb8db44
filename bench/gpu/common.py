"""What the parts of the GPU kit share: the sizes of a run (GPU or dry run), the oracle, timing.

Every part is a separate process started by ``bench/gpu/check.sh``; each writes one JSON file
under the output folder, so a part that fails or runs out of time leaves the others' results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# Llama-3-8B linear layers (out, in): hidden 4096, 8 KV heads of 128, MLP 14336.
LLAMA3_8B = {
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
    "o_proj": (4096, 4096), "gate_proj": (14336, 4096), "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run of the kit: the GPU run, or the dry run on the CPU (same code)."""

    device: str
    shapes: dict  # projection name -> (out, in): Llama-3-8B's, or the same ratios / 64
    layers: int  # Llama-shaped layers in one batched Riemannion step
    r: int
    dense_max: int  # largest m·n checked against the dense (m×n) float64 oracle on the CPU
    tensors: tuple  # shapes of Tensorion's direction check
    merge_shape: tuple  # (out, in) of the modules of the fixed-rank merge check
    bf16: bool  # bf16 adapters with fp32 masters (the GPU setting); the dry run uses it too
    scale: str  # how the shapes relate to Llama-3-8B's, for the report


def sizes(dry_run: bool) -> Sizes:
    """The GPU run's sizes, or the dry run's: every dimension of Llama-3-8B divided by 64."""
    if dry_run:
        small = {k: (m // 64, n // 64) for k, (m, n) in LLAMA3_8B.items()}
        return Sizes("cpu", small, layers=2, r=2, dense_max=1 << 30,
                     tensors=((16, 64), (4, 8, 16), (3, 4, 2, 8)), merge_shape=(16, 64), bf16=True,
                     scale="Llama-3-8B shapes / 64")
    return Sizes("cuda", dict(LLAMA3_8B), layers=2, r=16, dense_max=1024 * 4096,
                 tensors=((1024, 4096), (8, 512, 1024), (3, 8, 128, 256)),
                 merge_shape=(1024, 4096), bf16=True, scale="Llama-3-8B shapes")


def load_reference():
    """``riemann_zero.manifold.reference``, the dense float64 oracle the test suite trusts (it
    imports nothing of the package; bench/ may import it beside the public API)."""
    from riemann_zero.manifold import reference

    return reference


def sync(device: str) -> None:
    if device != "cpu":
        torch.accelerator.synchronize()


class Timer:
    """Wall time of a block, bracketed by device synchronisations."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start
