"""The bench configuration (:class:`BenchConfig`): fields, defaults, validation, derived settings."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from .data.catalog import DATASETS, INPUT_SHAPES, canonical_name
from .clock import check_clock
from .losses import LOSSES
from .models import MODELS
from .registry import get_spec
from .schema import (STEP_SIZE, Bool, ConfigError, Int, Kind, Mapping_, Maybe, NameList, Number, OneOf, PathText,
                     Seeds, Text, check_fields, check_model_args, check_model_size, check_optimizer_args,
                     check_unknown, max_threads)

__all__ = ["BenchConfig", "DEFAULT_OPTIMIZERS"]

#: Optimizers of the default ``pmptrain bench`` (MNIST-1D, ~2 minutes on 2 cores).
DEFAULT_OPTIMIZERS: Tuple[str, ...] = ("sgd", "adam", "emsa", "binary-msa", "binaryconnect")


_LR = STEP_SIZE

#: Upper bounds of the bench's counts: generous for any real run, small enough that a typo
#: (``--epochs 99999999999999999999``) is refused instead of running for ever.
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000
MAX_EXAMPLES = 1 << 31
#: Largest generated MNIST-1D set (the published one has 5000 examples; 10⁶ take minutes to generate).
MAX_MNIST1D_SAMPLES = 1_000_000


def check_lr(lr, optimizers, opt: str = "lr"):
    """``lr``: None, a number in ``[0,`` :data:`~pmptrain.bench.schema.MAX_STEP_SIZE` ``]``, or
    ``{name: number}`` naming each optimizer of the run (``optimizers``: registry names) at most once;
    returns it with registry names."""
    if not isinstance(lr, dict):
        return None if lr is None else _LR.check(opt, lr)
    out = {}
    for k, v in lr.items():
        name = get_spec(k).name
        if name in out:
            raise ConfigError(f"--lr: {name} given twice")
        if name not in optimizers:
            raise ConfigError(f"--lr: {name} is not benchmarked (--optimizers {','.join(optimizers)})")
        out[name] = _LR.check(opt, v)
    return out


def check_args_in_run(optimizer_args, optimizers) -> None:
    """Overrides only for optimizers of the run (others would be silently ignored)."""
    for name in optimizer_args:
        if name not in optimizers:
            raise ConfigError(f"--opt-arg {name}: {name} is not benchmarked (--optimizers {','.join(optimizers)})")

#: The kind of every :class:`BenchConfig` field (docs/cli.md, "What is validated").
FIELDS: Dict[str, Kind] = {
    "dataset": Text(),
    "model": Text(),
    "model_args": Mapping_(),
    "optimizers": NameList(),
    "epochs": Int(1, MAX_EPOCHS),
    "seeds": Seeds(),
    "batch_size": Int(1, MAX_BATCH),
    "shuffle": Bool(),
    "eval_batch_size": Int(1, MAX_BATCH),
    "tune": Maybe(OneOf(["lr"])),
    "val_fraction": Maybe(Number(0, 1, hi_open=True)),
    "target_acc": Number(0, 1, lo_open=True),
    "loss": OneOf(LOSSES),
    "keep": NameList(choices=("first", "last"), nonempty=False, empty_words=("", "none")),
    "scale": Maybe(OneOf(("tensor", "channel"), str.lower), none_word="none"),
    "init": OneOf(("sign", "uniform")),
    "density_convention": OneOf(("discrete", "trainable")),
    "max_train": Maybe(Int(1, MAX_EXAMPLES)),
    "max_test": Maybe(Int(1, MAX_EXAMPLES)),
    "mnist1d_samples": Int(10, MAX_MNIST1D_SAMPLES),
    "data_dir": Maybe(PathText()),
    "download": Maybe(Bool()),
    "tensorboard": Bool(),
    "threads": Maybe(Int(1, max_threads())),
    "clock": OneOf(("wall", "cpu")),
    "eval_every": Maybe(Int(1, 10_000_000)),
    "fsdp": Bool(),
    "preset": Maybe(Text()),
}


@dataclasses.dataclass
class BenchConfig:
    """Everything that determines a bench; the fields of ``pmptrain train --config X.yaml``.

    Attributes (defaults in brackets; the CLI option is ``--`` + the name with ``-``):
        dataset: data-set name [``"mnist1d"``]. model: model name [``"mlp"``].
        model_args: keyword arguments of the model builder [``{}``].
        optimizers: registry names [:data:`DEFAULT_OPTIMIZERS`].
        optimizer_args: per-optimizer keyword overrides, ``{name: {key: value}}`` [``{}``].
        epochs: training epochs [20]. seeds: seeds, one run each [``[0, 1, 2]``].
        batch_size: global batch size [128]. eval_batch_size: evaluation batch [1000].
        shuffle: permute the training set every epoch (seeded by ``(seed, epoch)``) [True];
            ``False`` feeds it in file order every epoch (the E-MSA reference MNIST protocol).
        lr: value of each optimizer's step-size hyper-parameter (``spec.lr_key``), either one
            number for all or ``{name: value}`` [None: registry defaults].
        tune: ``None`` or ``"lr"``: run every value of each optimizer's grid, keep the best
            (median final validation accuracy over seeds) [None].
        val_fraction: validation split carved from the training set; ``None`` means 0.1 when
            tuning and 0 otherwise [None].
        target_acc: test accuracy (fraction) for epochs/seconds-to-target [0.6].
        loss: ``"cross-entropy"`` or ``"squared-hinge"`` [``"cross-entropy"``].
        keep: layers left full precision in discrete runs, subset of ``["first", "last"]``
            [``["first", "last"]``]. scale: ``None``, ``"tensor"`` or ``"channel"`` [``"tensor"``].
        init: ``"sign"`` or ``"uniform"`` discretisation of the initial weights [``"sign"``].
        density_convention: the denominator of the reported non-zero fraction of discrete runs:
            ``"discrete"`` (the discrete weights) or ``"trainable"`` (all trainable parameters, BN
            affine included: Li & Hao's published "sparsity") [``"discrete"``].
        max_train, max_test: truncate the splits (smoke runs) [None]. mnist1d_samples: size of
            the generated MNIST-1D set [5000]. data_dir, download: see :mod:`pmptrain.bench.data`.
        tensorboard: write TensorBoard logs [True]. threads: ``torch.set_num_threads`` [None].
        clock: the training clock, ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (process CPU
            time, ``time.process_time``; needs ``threads = 1``; :mod:`pmptrain.bench.clock`) ["wall"].
        eval_every: also evaluate on the test set every this many training steps (counted over the
            whole run), for a finer time to the targets than one point per epoch [None: after each
            epoch only].
        fsdp: under ``torchrun``, shard the model with FSDP2 (``fully_shard`` on every module with
            parameters of its own, then the root) instead of wrapping it in DDP [False].
        preset: name of the preset the config came from, for the record [None].
    """

    dataset: str = "mnist1d"
    model: str = "mlp"
    model_args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizers: List[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_OPTIMIZERS))
    optimizer_args: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    epochs: int = 20
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 128
    shuffle: bool = True
    eval_batch_size: int = 1000
    lr: Any = None
    tune: Optional[str] = None
    val_fraction: Optional[float] = None
    target_acc: float = 0.6
    loss: str = "cross-entropy"
    keep: List[str] = dataclasses.field(default_factory=lambda: ["first", "last"])
    scale: Optional[str] = "tensor"
    init: str = "sign"
    density_convention: str = "discrete"
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    mnist1d_samples: int = 5000
    data_dir: Optional[str] = None
    download: Optional[bool] = None
    tensorboard: bool = True
    threads: Optional[int] = None
    clock: str = "wall"
    eval_every: Optional[int] = None
    fsdp: bool = False
    preset: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "config") -> "BenchConfig":
        """Build from a mapping (YAML/JSON) and :meth:`validate` it; unknown keys raise
        :class:`~pmptrain.bench.schema.ConfigError` naming them and ``where``."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of options, got {type(d).__name__}")
        d = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in d.items()}
        check_unknown(d, (f.name for f in dataclasses.fields(cls)), where)
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validation
    def validate(self) -> "BenchConfig":
        """Check every field against :data:`FIELDS` and the rules between fields; normalise
        spellings (comma lists, registry names). Raises
        :class:`~pmptrain.bench.schema.ConfigError` (a ``ValueError``) naming the option."""
        check_fields(self, FIELDS)
        if self.dataset not in DATASETS:
            try:
                self.dataset = canonical_name(self.dataset)
            except ValueError:
                raise ConfigError(f"--dataset: unknown data set {self.dataset!r}; valid: {', '.join(DATASETS)}") from None
        model = self.model.strip().lower().replace("-", "_")
        if model not in MODELS:
            raise ConfigError(f"--model: unknown model {self.model!r}; valid: {', '.join(sorted(MODELS))}")
        check_model_args(MODELS[model], self.model_args)
        check_model_size(MODELS[model], INPUT_SHAPES[self.dataset], 10, self.model_args, model)
        self.optimizers = [get_spec(n).name for n in self.optimizers]  # raises with the valid names
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"--optimizers: names repeated: {self.optimizers}")
        self.optimizer_args = check_optimizer_args(self.optimizer_args)
        check_args_in_run(self.optimizer_args, self.optimizers)
        self.lr = check_lr(self.lr, self.optimizers)
        if self.tune and self.lr is not None:
            raise ConfigError("--tune: --tune lr and --lr are exclusive")
        check_clock(self.clock, self.threads)
        return self

    # ---------------------------------------------------------------- derived
    def effective_val_fraction(self) -> float:
        if self.val_fraction is not None:
            return float(self.val_fraction)
        return 0.1 if self.tune else 0.0

    def settings(self, name: str) -> List[Dict[str, Any]]:
        """The hyper-parameter settings (keyword overrides) run for optimizer ``name``."""
        spec = get_spec(name)
        base = dict(self.optimizer_args.get(spec.name, {}))
        if self.tune:
            return [dict(base, **{spec.lr_key: v}) for v in spec.tune_grid]
        lr = self.lr.get(spec.name) if isinstance(self.lr, dict) else self.lr
        if lr is not None:
            base[spec.lr_key] = lr
        return [base]
