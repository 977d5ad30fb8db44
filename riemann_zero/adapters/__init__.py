"""PEFT-facing: the rank-2r manifold layout of a LoRA adapter (``layout``), FSDP2 placement,
the one stock-PEFT export writer, LOI and the baselines' initialisations (PiSSA, LoRA-GA,
StelLA)."""
