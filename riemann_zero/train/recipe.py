"""Training recipes: a typed schema, YAML loading, dotted ``key=value`` overrides, early validation.

A recipe is one YAML file whose keys mirror the dataclasses below (PEFT's own names for the LoRA
block, the DeepSpeed config nested verbatim under ``deepspeed:``). Every key has a default, so a
recipe only states what differs. Unknown keys fail with a did-you-mean suggestion; values are
coerced to the field's type (``max_steps=3`` is an int, ``lora.target_modules=q_proj,v_proj`` a
list). Checks that need no weights (files exist, target modules exist, rank fits) live in
:mod:`riemann_zero.train.preflight`; the optimizer rules come from
:mod:`riemann_zero.optim.registry`; the generic parsing (coercion, did-you-mean, dotted keys)
from :mod:`riemann_zero.train.parsing`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from riemann_zero.optim import registry
from riemann_zero.progress import LOG_LEVELS
from riemann_zero.train.parsing import RecipeError, build_dataclass, set_dotted, yaml_problem

__all__ = [
    "ModelConfig",
    "LoraSection",
    "AdapterSection",
    "ADAPTER_TYPES",
    "InitConfig",
    "DataConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "EvalAfterConfig",
    "MemoryConfig",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "orthogonal_config",
    "apply_overrides",
    "recipe_to_dict",
    "RUN_NEUTRAL_KEYS",
    "SWITCHABLE_SECTIONS",
    "SMOKE",
]

SCHEDULES = ("linear", "cosine", "constant")
ADAPTER_TYPES = ("lora", "oft", "boft")
ENGINES = ("deepspeed", "fsdp2")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class ModelConfig:
    """Base model. ``name_or_path``: hub id, local directory, or ``asset:smollm2[:LAYERS]``."""

    name_or_path: str = "asset:smollm2"
    dtype: str = "auto"  # auto: bfloat16 if deepspeed.bf16.enabled else float32
    gradient_checkpointing: bool = False
    # Under ZeRO-3 and FSDP2 each rank creates and reads only its part of the base (zero.Init /
    # meta device + its slices of the safetensors files); false: every rank loads it whole first.
    partitioned_load: bool = True
    # Full fine-tuning instead of LoRA: regular expressions (re.search) over parameter names;
    # the matching parameters train whole, all others are frozen, the lora section is unused.
    trainable: list[str] = field(default_factory=list)


@dataclass
class LoraSection:
    """PEFT ``LoraConfig`` fields (same names); manifold optimizers read ``r`` as the rank."""

    r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj"])


@dataclass
class AdapterSection:
    """Which PEFT adapter is trained: ``lora`` (the ``lora:`` section, the default) or PEFT's
    orthogonal ``oft``/``boft``, whose ``OFTConfig``/``BOFTConfig`` keyword arguments go verbatim
    under ``config`` (e.g. ``{oft_block_size: 32, use_cayley_neumann: true}``; ``target_modules``
    defaults to ``lora.target_modules``). Orthogonal adapters train with ``optimizer.name:
    adamw`` and ``init.method: peft``; they are what ``python -m riemann_zero.merge --method
    geodesic|orthofuse`` merges."""

    type: str = "lora"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class InitConfig:
    """Adapter initialisation: ``loi`` (Theorem 5.1), ``zero``/``random`` (manifold); for the
    PEFT-parametrised baselines ``peft`` (PEFT's default), ``pissa`` or ``lora_ga`` (PEFT's)."""

    method: str = "loi"
    p: int = 16  # LOI oversampling
    q: int = 1  # LOI power steps
    alpha: float | None = None  # LOI scale; None = -0.01/sqrt(r), the paper's LLM setting
    batches: int = 4  # calibration micro-batches (the first ones of the shuffled train set)
    niter: int = 0  # pissa: randomized-SVD iterations (0 = exact SVD; 16 for 8B-size weights)


@dataclass
class DataConfig:
    """Datasets as understood by ``riemann_zero.data.load_examples``."""

    train: str = "commonsense"
    train_limit: int | None = None
    eval: str | None = None  # None: the train dataset
    eval_split: str = "eval"  # "eval" (commonsense test sets) or "holdout" (kept out of train)
    eval_limit: int = 64  # 0: no eval loss
    template: str = "chat"
    max_length: int = 256
    packing: bool = False


@dataclass
class OptimizerConfig:
    """Optimizer and its hyper-parameters; common keys a given optimizer does not use are ignored
    (``riemann_zero.optim.registry`` lists which it takes). ``options``: further keyword
    arguments of that optimizer, e.g. ``{ortho: newton_schulz, ns_steps: 5}`` for Riemannion;
    unknown names fail in preflight with the valid ones listed."""

    name: str = "riemannion"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # Riemannion, RiemannSGD, Muon
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    reg: float = 0.01  # rprec_adamw damping
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule applied to every ``param_groups[i]["lr"]``."""

    type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    """Loop settings. The global batch is micro_batch_size x grad. accumulation x world size."""

    epochs: float = 1.0
    micro_batch_size: int = 4
    gradient_accumulation_steps: int | None = None  # None: from global_batch_size (or 1)
    global_batch_size: int | None = None
    gradient_clipping: float = 1.0  # 0 disables
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    save_every: int = 0  # optimizer steps; 0 = no intermediate checkpoints
    keep_last: int = 2
    log_every: int = 1
    # Steps with a non-finite loss tolerated when the engine skipped their update (DeepSpeed's
    # overflow check); the run stops at the next one. None: 0 in fp32, 3 with bf16/fp16.
    skip_nonfinite_steps: int | None = None
    verify_checkpoints: str = "checksum"  # at resume: "checksum" (SHA-256) or "size" only


@dataclass
class EvalAfterConfig:
    """Benchmark stage run on rank 0 after training (``python -m eval RUN_DIR ...``)."""

    suite: str | None = None
    limit: int = 50
    tasks: list[str] | None = None  # a subset of the suite's lm-eval tasks (None: all)


@dataclass
class LoggingConfig:
    """Where the metrics of metrics.jsonl also go (rank 0): TensorBoard event files under
    ``output_dir/tensorboard/`` (on by default), Weights & Biases when asked and installed."""

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "riemann-zero"
    wandb_mode: str | None = None  # online | offline | disabled (None: wandb's default/env)


@dataclass
class MemoryConfig:
    """Per-rank memory estimate, printed before loading, and the limits it must fit.

    :mod:`riemann_zero.train.memory` estimates; a recipe whose estimate exceeds the limits is
    refused with one line naming the figure and the fixes."""

    check: bool = True  # false: print the estimate, never refuse
    device_gib: float | None = None  # per-rank accelerator memory; None: this GPU's free memory
    host_gib: float | None = None  # host memory per node; None: /proc/meminfo MemAvailable


@dataclass
class Recipe:
    """A full training recipe."""

    output_dir: str = "runs/default"
    max_steps: int | None = None  # caps (and, when set, defines) the number of optimizer steps
    seed: int = 0
    resume: str = "auto"  # auto | never | PATH of a checkpoint directory
    stop_after: int | None = None  # simulate a crash right after this step (tests of resume)
    smoke: bool = False  # a quick check of the pipeline: SMOKE's settings win over the file's
    log_level: str = "info"  # debug | info | warning (what the libraries print; see progress)
    engine: str = "deepspeed"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_after: EvalAfterConfig = field(default_factory=EvalAfterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    deepspeed: dict[str, Any] = field(
        default_factory=lambda: {"zero_optimization": {"stage": 0}})

    def __post_init__(self) -> None:
        _check_values(self)


# Keys that do not change what a run computes: a run directory may be resumed with other values.
RUN_NEUTRAL_KEYS = ("output_dir", "resume", "stop_after", "eval_after", "train.log_every",
                    "train.verify_checkpoints", "log_level", "logging", "memory")
# What ``smoke=true`` sets, whatever the recipe file says (a key also given on the command line
# keeps the command line's value): the real 2-layer SmolLM2 cut, one LOI
# calibration batch without power steps, a few short steps, no checkpoints, no eval stage. It
# checks that a recipe's data, optimizer, engine and export run end to end (the model is
# replaced, so it says nothing about the recipe's own model).
SMOKE = ("model.name_or_path=asset:smollm2:2", "max_steps=5", "init.batches=1", "init.q=0",
         "data.train_limit=40", "data.eval_limit=8", "data.max_length=96",
         "train.micro_batch_size=2", "train.gradient_accumulation_steps=null",
         "train.global_batch_size=null", "train.save_every=0", "train.eval_every=0",
         "eval_after=null")
# Sections that ``null``/``false`` (in YAML or as ``eval_after=null``) switch off: their defaults
# are the switched-off state.
SWITCHABLE_SECTIONS = ("eval_after",)


def _choices(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"{key} must be one of {list(allowed)}, but got {value!r}{extra}")


def _positive(key: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RecipeError(f"{key} must be {bound}, but got {value!r}")


def _check_finite(data: Any, key: str = "") -> None:
    """Every number anywhere in the recipe (the deepspeed block and options too) is finite."""
    if isinstance(data, dict):
        for k, v in data.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        raise RecipeError(f"{key} is {data!r}; every number in a recipe must be finite")


def _check_values(rc: Recipe) -> None:
    _check_finite(dataclasses.asdict(rc))
    _choices("engine", rc.engine, ENGINES)
    _choices("model.dtype", rc.model.dtype, DTYPES)
    _choices("init.method", rc.init.method, registry.INIT_METHODS)
    _choices("optimizer.name", rc.optimizer.name, tuple(registry.OPTIMIZERS))
    _choices("schedule.type", rc.schedule.type, SCHEDULES)
    _choices("data.template", rc.data.template, ("chat", "alpaca"))
    _choices("data.eval_split", rc.data.eval_split, ("eval", "holdout"))
    _choices("train.verify_checkpoints", rc.train.verify_checkpoints, ("checksum", "size"))
    _choices("log_level", rc.log_level, LOG_LEVELS)
    for key, value in [("lora.r", rc.lora.r), ("optimizer.lr", rc.optimizer.lr),
                       ("train.micro_batch_size", rc.train.micro_batch_size),
                       ("train.epochs", rc.train.epochs), ("max_steps", rc.max_steps),
                       ("train.keep_last", rc.train.keep_last), ("data.max_length",
                       rc.data.max_length), ("stop_after", rc.stop_after),
                       ("train.global_batch_size", rc.train.global_batch_size),
                       ("train.gradient_accumulation_steps", rc.train.gradient_accumulation_steps),
                       ("init.batches", rc.init.batches), ("train.log_every", rc.train.log_every),
                       ("eval_after.limit", rc.eval_after.limit),
                       ("memory.device_gib", rc.memory.device_gib),
                       ("memory.host_gib", rc.memory.host_gib)]:
        _positive(key, value)
    for key, value in [("optimizer.weight_decay", rc.optimizer.weight_decay),
                       ("train.gradient_clipping", rc.train.gradient_clipping),
                       ("train.eval_every", rc.train.eval_every),
                       ("train.save_every", rc.train.save_every),
                       ("schedule.warmup_steps", rc.schedule.warmup_steps),
                       ("init.p", rc.init.p), ("init.q", rc.init.q),
                       ("init.niter", rc.init.niter),
                       ("train.skip_nonfinite_steps", rc.train.skip_nonfinite_steps)]:
        _positive(key, value, allow_zero=True)
    if not 0.0 <= rc.schedule.warmup_ratio < 1.0:
        raise RecipeError(f"schedule.warmup_ratio must be in [0, 1), but got "
                          f"{rc.schedule.warmup_ratio!r}")
    if not 0.0 <= rc.lora.lora_dropout < 1.0:
        raise RecipeError(f"lora.lora_dropout must be in [0, 1), but got {rc.lora.lora_dropout!r}")
    if not rc.lora.target_modules:
        raise RecipeError("lora.target_modules is empty; name at least one module, e.g. [q_proj]")
    if len(rc.optimizer.betas) != 2:
        raise RecipeError(f"optimizer.betas needs two numbers, but got {rc.optimizer.betas!r}")
    problem = registry.init_error(rc.optimizer.name, rc.init.method)
    if problem is not None:
        raise RecipeError(problem)
    _choices("adapter.type", rc.adapter.type, ADAPTER_TYPES)
    problem = registry.adapter_error(rc.optimizer.name, rc.adapter.type, rc.init.method)
    if problem is not None:
        raise RecipeError(problem)
    if not isinstance(rc.adapter.config, dict):
        raise RecipeError(f"adapter.config must be a mapping of PEFT config keys, but got "
                          f"{type(rc.adapter.config).__name__}")
    if rc.resume not in ("auto", "never") and not Path(rc.resume).is_dir():
        raise RecipeError(f"resume must be 'auto', 'never' or an existing checkpoint directory, "
                          f"but got {rc.resume!r}")
    if not isinstance(rc.deepspeed, dict):
        raise RecipeError(f"deepspeed must be a mapping (a DeepSpeed config), but got "
                          f"{type(rc.deepspeed).__name__}")


def orthogonal_config(recipe: Recipe) -> Any:
    """PEFT's ``OFTConfig``/``BOFTConfig`` of an ``adapter.type: oft|boft`` recipe.

    Raises:
        RecipeError: a key PEFT does not know, or values PEFT refuses (its message).
    """
    from peft import BOFTConfig, OFTConfig

    kwargs = {"target_modules": list(recipe.lora.target_modules), **recipe.adapter.config}
    cls = OFTConfig if recipe.adapter.type == "oft" else BOFTConfig
    try:
        return cls(task_type="CAUSAL_LM", **kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"adapter.config for {recipe.adapter.type}: {err}") from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (what ``run.json`` stores)."""
    return dataclasses.asdict(recipe)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings to a recipe dict (before it is turned into a Recipe)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form dotted.key=value, "
                              f"e.g. max_steps=3 or optimizer.lr=2e-4")
        key, raw = item.split("=", 1)
        set_dotted(Recipe, data, key.strip(), raw.strip(), switchable=SWITCHABLE_SECTIONS)
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply overrides.

    Raises:
        RecipeError: missing file, unknown key (with a suggestion), or a value of the wrong type.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; recipes live in "
                              f"recipes/*.yaml")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                raise RecipeError(f"{path}: {yaml_problem(err)}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path} must hold a YAML mapping at top level, but got "
                              f"{type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    if build_dataclass(Recipe, data, switchable=SWITCHABLE_SECTIONS).smoke:
        # SMOKE wins over the recipe file; the command line's own keys win over SMOKE.
        data = apply_overrides(apply_overrides(data, list(SMOKE)), list(overrides))
    return build_dataclass(Recipe, data, switchable=SWITCHABLE_SECTIONS)

