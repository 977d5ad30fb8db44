"""The recipe driver: ``python -m riemann_zero.train RECIPE.yaml [dotted.key=value ...]``.

``cli`` (entry point) → ``loop`` (one run, in named phases) → ``steps`` (one optimizer step,
finiteness, metrics log, outputs), ``batches`` (data) and ``build`` (model, optimizer, schedule)
→ ``preflight`` (checks without weights) → ``memory`` (the per-rank estimate) → ``engines`` (one
class per engine: DeepSpeed, FSDP2; how the base is created) → ``checkpoint`` (atomic
checkpoints) → ``recipe`` (the schema) → ``parsing``. Import the modules themselves
(``riemann_zero.train.cli`` …); this package's ``__init__`` stays empty so that importing one
part does not import the rest.
"""
