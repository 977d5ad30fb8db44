"""The recipe driver: ``python -m riemann_zero.train RECIPE.yaml [dotted.key=value ...]``.

``cli`` (entry point) → ``loop`` (one run) → ``build`` (model, optimizer, schedule) and
``engines`` (DeepSpeed, FSDP2) → ``registry`` (the optimizers) → ``preflight`` (checks without
weights) → ``recipe`` (the schema) → ``parsing``; ``checkpoint`` writes and reads atomic
checkpoints. Import the modules themselves (``riemann_zero.train.cli`` …); this package's
``__init__`` stays empty so that importing one part does not import the rest.
"""
