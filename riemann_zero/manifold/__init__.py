"""Geometry only: the fixed-rank manifold (readable primitives and the fused 2r×2r step), the
Stiefel manifold, and their dense float64 reference. Imports :mod:`riemann_zero.linalg` and
torch; never ``torch.optim``, ``torch.distributed`` or PEFT."""
