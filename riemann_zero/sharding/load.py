"""Partitioned loading: each rank reads only its own part of every tensor of a safetensors
checkpoint, straight into the engine's layout, so no rank ever holds the whole model.

- ZeRO-3 (``p.ds_id``): the rank's chunk covers elements [start, stop) of the row-major flattened
  tensor, i.e. rows [start // n, ⌈stop / n⌉) cut at both ends; only those rows are read. Weights
  DeepSpeed already holds whole on every rank (``ds_persist``, below its persistence threshold)
  are read whole: they are small by definition.
- FSDP2 (a ``Shard(d)`` DTensor): the local slice along d.
- Anything else: the whole tensor.

safetensors memory-maps the file and copies only the requested slice, so the pages a rank touches
are its own part (plus the file header).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor, nn

from riemann_zero.sharding.params import dtensor_rows, held_whole, layout_of, zero3_chunk

__all__ = ["checkpoint_files", "CheckpointReader", "load_local_parts", "checkpoint_keys"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """{tensor name: file} of the safetensors checkpoint in ``folder`` (one file or an index)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), folder / SINGLE)
    raise FileNotFoundError(
        f"partitioned loading reads safetensors, but {folder} has neither {SINGLE} nor {INDEX}; "
        f"convert the checkpoint with save_pretrained(..., safe_serialization=True) or set "
        f"model.partitioned_load=false")


class CheckpointReader:
    """Slices of the tensors of a safetensors checkpoint (files opened once, memory-mapped)."""

    def __init__(self, folder: str | Path) -> None:
        self.files = checkpoint_files(folder)
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _handle(self, key: str):
        from safetensors import safe_open

        path = self.files[key]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int, dim: int = 0) -> Tensor:
        """Elements [start, stop) of the tensor along ``dim`` (0 or 1)."""
        sl = self._handle(key).get_slice(key)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def whole(self, key: str) -> Tensor:
        return self._handle(key).get_tensor(key)


def checkpoint_keys(model: nn.Module, prefixes: dict[int, str] | None = None
                    ) -> Iterator[tuple[list[str], Tensor]]:
    """(candidate checkpoint names, parameter) for every distinct parameter of ``model``.

    ``prefixes`` maps ``id(module)`` to that module's name in the checkpoint (taken from the base
    model before a wrapper such as PEFT renamed it; modules absent from it, e.g. adapters, are
    skipped). Without it, names are the model's own. A tied parameter gets every name it has
    (e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``); the first one found is read.
    """
    names: dict[int, list[str]] = {}
    params: dict[int, Tensor] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = mod_name if prefixes is None else prefixes.get(id(module))
        if prefix is None:
            continue
        for p_name, p in module.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(f"{prefix}.{p_name}" if prefix else p_name)
            params[id(p)] = p
    for key, p in params.items():
        yield names[key], p


def _full_shape(p: Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if layout_of(p) == "zero3" else tuple(p.shape)


@torch.no_grad()
def _read_into(p: Tensor, reader: CheckpointReader, key: str) -> None:
    kind = layout_of(p)
    if kind == "zero3":
        if held_whole(p):  # kept whole on every rank: small
            p.data.copy_(reader.whole(key).to(p.dtype))
        start, stop = zero3_chunk(p)
        if stop <= start:
            return
        shape = tuple(p.ds_shape)
        n = 1 if len(shape) == 1 else int(torch.Size(shape[1:]).numel())
        i0, i1 = start // n, -(-stop // n)
        part = reader.rows(key, i0, i1).reshape(-1)[start - i0 * n: stop - i0 * n]
        p.ds_tensor.data.view(-1)[: part.numel()].copy_(part.to(p.ds_tensor.dtype))
        return
    if kind == "fsdp2":
        local = p.to_local()
        dim = p.placements[0].dim
        if dim > 1:
            raise ValueError(f"partitioned loading reads Shard(0) or Shard(1), but got "
                             f"{p.placements} for {key}")
        sl = dtensor_rows(p.shape[dim], p)
        if sl.stop > sl.start:
            local.copy_(reader.rows(key, sl.start, sl.stop, dim).to(local.dtype))
        return
    p.data.copy_(reader.whole(key).to(p.dtype))


def load_local_parts(model: nn.Module, folder: str | Path,
                     prefixes: dict[int, str] | None = None) -> int:
    """Fill every checkpoint parameter of ``model`` with this rank's part of its stored value.

    Args:
        model: the model, its parameters already laid out by the engine (ZeRO-3 ``zero.Init``,
            FSDP2 ``fully_shard`` + ``to_empty``) or plain.
        folder: the safetensors checkpoint.
        prefixes: see :func:`checkpoint_keys`.
    Returns:
        the number of parameters read.
    Raises:
        KeyError: a parameter has no tensor in the checkpoint (one line naming it).
        ValueError: a stored shape differs from the model's.
    """
    count = 0
    with CheckpointReader(folder) as reader:
        for names, p in checkpoint_keys(model, prefixes):
            key = next((k for k in names if k in reader.files), None)
            if key is None:
                raise KeyError(f"the checkpoint in {folder} has no tensor for parameter "
                               f"{names[0]}; set model.partitioned_load=false to load it with "
                               f"transformers instead")
            stored, want = reader.shape(key), _full_shape(p)
            if stored != want:
                raise ValueError(f"{key}: the checkpoint holds shape {stored}, the model "
                                 f"expects {want}")
            _read_into(p, reader, key)
            count += 1
    return count
