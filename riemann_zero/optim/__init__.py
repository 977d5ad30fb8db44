"""Optimizers: the one base of the package's optimizers (state per name, step skeleton, checks;
fixed-rank adapters stepped in buckets), the one AdamW update, Riemannion, RiemannLoRA (SGD and
Adam), StelLA, Tensorion, the baselines (per-factor Muon, AdamW, PEFT's Riemannian-preconditioned
AdamW) and the registry, the only table of optimizer names."""
