"""Partitioned loading: each rank reads only its own part of every tensor of a safetensors
checkpoint, straight into the engine's layout, so no rank ever holds the whole model.

- ZeRO-3 (``p.ds_id``): the rank's chunk is elements [start, stop) of the row-major flattened
  tensor, one contiguous byte range of the file, read into ``ds_tensor`` in place. Weights
  DeepSpeed already holds whole on every rank (``ds_persist``, below its persistence threshold)
  are read whole: they are small by definition.
- FSDP2 (a ``Shard(0)`` DTensor): the local rows, again one contiguous byte range.
- Anything else: the whole tensor.

The bytes are read with ordinary file reads, not a memory map: a mapped file's pages count in the
process's resident memory for as long as it stays mapped, so reading a whole model through a map
looks (and, until the kernel drops them, is) as large as the model. The safetensors format is a
little-endian u64 header length, a JSON header {name: {dtype, shape, data_offsets}} and the raw
row-major data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from riemann_zero.sharding.layouts import layout_of, stored_shape

__all__ = ["checkpoint_files", "CheckpointReader", "load_local_parts", "checkpoint_keys"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return {"data_start": 8 + size, "tensors": header}


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """{tensor name: file} of the safetensors checkpoint in ``folder`` (one file or an index)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / SINGLE).is_file():
        return dict.fromkeys(_header(folder / SINGLE)["tensors"], folder / SINGLE)
    raise FileNotFoundError(
        f"partitioned loading reads safetensors, but {folder} has neither {SINGLE} nor {INDEX}; "
        f"convert the checkpoint with save_pretrained(..., safe_serialization=True) or set "
        f"model.partitioned_load=false")


class CheckpointReader:
    """Contiguous element ranges of the tensors of a safetensors checkpoint, by file reads."""

    def __init__(self, folder: str | Path) -> None:
        self.files = checkpoint_files(folder)
        self._meta: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        for path in sorted(set(self.files.values())):
            head = _header(path)
            for key, info in head["tensors"].items():
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, which "
                                     f"partitioned loading does not read; set "
                                     f"model.partitioned_load=false")
                self._meta[key] = (path, _DTYPES[info["dtype"]], tuple(info["shape"]),
                                   head["data_start"] + info["data_offsets"][0])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][2]

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Elements [start, stop) of the row-major flattened tensor ``key``, in its stored dtype;
        read straight into ``out`` (1-D, CPU, contiguous) when it has that dtype."""
        path, dtype, _, begin = self._meta[key]
        direct = (out is not None and out.dtype == dtype and out.device.type == "cpu"
                  and out.is_contiguous() and out.numel() == stop - start)
        buf = out if direct else torch.empty(stop - start, dtype=dtype)
        view = memoryview(buf.view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
        with open(path, "rb", buffering=0) as fh:
            fh.seek(begin + start * buf.element_size())
            done = 0
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise EOFError(f"{path} ends inside tensor {key}: the file is truncated")
                done += got
        return buf


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


def _fill(reader: CheckpointReader, key: str, dst: Tensor, start: int) -> None:
    """dst (contiguous) ← elements [start, start + dst.numel()) of tensor ``key``."""
    flat = dst.view(-1)
    buf = reader.read(key, start, start + flat.numel(), out=flat)
    if buf is not flat:
        flat.copy_(buf)


@torch.no_grad()
def _read_into(p: Tensor, reader: CheckpointReader, key: str) -> None:
    """Every tensor on this rank that stores a range of p (its layout's ``storage``) ← that range
    of tensor ``key``."""
    try:
        held = layout_of(p).storage(p)
    except ValueError as err:
        raise ValueError(f"partitioned loading of {key}: {err}") from None
    for start, flat in held:
        if flat.numel():
            _fill(reader, key, flat, start)


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
    reader = CheckpointReader(folder)
    for names, p in checkpoint_keys(model, prefixes):
        key = next((k for k in names if k in reader.files), None)
        if key is None:
            raise KeyError(f"the checkpoint in {folder} has no tensor for parameter "
                           f"{names[0]}; set model.partitioned_load=false to load it with "
                           f"transformers instead")
        stored, want = reader.shape(key), stored_shape(p)
        if stored != want:
            raise ValueError(f"{key}: the checkpoint holds shape {stored}, the model "
                             f"expects {want}")
        _read_into(p, reader, key)
        count += 1
    return count
