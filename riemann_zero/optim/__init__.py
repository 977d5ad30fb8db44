"""Optimizers: the manifold base class, the one AdamW update, Riemannion, RiemannLoRA (SGD and
Adam), and the baselines (StelLA, per-factor Muon, AdamW, PEFT's Riemannian-preconditioned
AdamW)."""
