"""Test probe, imported at start-up by every Python process that has this folder on PYTHONPATH
and ``RZ_TEST_FORWARD_LOG`` set (the resume tests put it there for the driver's processes): each
forward pass of an ``nn.Embedding`` (once per model forward: the token embedding) appends one JSON
line ``{"train": module.training, "ids": input ids}`` to ``$RZ_TEST_FORWARD_LOG.rank$RANK``.
It observes the driver from outside: nothing in the package knows about it. A sitecustomize
this one shadows still runs (see ``_chain``)."""

import os

_LOG = os.environ.get("RZ_TEST_FORWARD_LOG")

if _LOG:
    import json

    import torch

    def _record(module, inputs):
        if isinstance(module, torch.nn.Embedding) and inputs and torch.is_tensor(inputs[0]):
            path = f"{_LOG}.rank{os.environ.get('RANK', '0')}"
            with open(path, "a") as fh:
                fh.write(json.dumps({"train": module.training, "ids": inputs[0].tolist()}) + "\n")

    torch.nn.modules.module.register_module_forward_pre_hook(_record)


def _chain() -> None:
    """Run the sitecustomize this one shadows, if the interpreter has one (Debian's, say)."""
    import importlib.machinery
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == here:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry or os.curdir])
        if spec is not None and spec.loader is not None:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_chain()
