"""Riemannion inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` (docs/design.md §10).

``trainer`` holds the two classes (and how they fit into the Trainer), ``state`` what accelerate's
distributed state needs on CPU processes (DeepSpeed and FSDP2 on gloo) and the FSDP2 sharding with
the manifold placement.
"""

from riemann_zero.hf.trainer import RZ_INITS, STATE_NAME, Trainer

__all__ = ["Trainer", "SFTTrainer", "STATE_NAME", "RZ_INITS"]  # noqa: F822 (SFTTrainer: __getattr__)


def __getattr__(name: str):
    """``SFTTrainer`` is built on first use, so ``riemann_zero.hf`` imports without TRL."""
    if name != "SFTTrainer":
        raise AttributeError(name)
    from riemann_zero.hf import trainer

    return trainer.SFTTrainer
