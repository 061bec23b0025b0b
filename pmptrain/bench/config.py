"""The bench configuration (:class:`BenchConfig`): fields, defaults, validation, derived settings."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

from .data import DATASETS, canonical_name
from .losses import LOSSES
from .models import MODELS
from .registry import get_spec

__all__ = ["BenchConfig", "DEFAULT_OPTIMIZERS"]

#: Optimizers of the default ``pmptrain bench`` (MNIST-1D, ~2 minutes on 2 cores).
DEFAULT_OPTIMIZERS: Tuple[str, ...] = ("sgd", "adam", "emsa", "binary-msa", "binaryconnect")


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
        max_train, max_test: truncate the splits (smoke runs) [None]. mnist1d_samples: size of
            the generated MNIST-1D set [5000]. data_dir, download: see :mod:`pmptrain.bench.data`.
        tensorboard: write TensorBoard logs [True]. threads: ``torch.set_num_threads`` [None].
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
    eval_batch_size: int = 1000
    lr: Any = None
    tune: Optional[str] = None
    val_fraction: Optional[float] = None
    target_acc: float = 0.6
    loss: str = "cross-entropy"
    keep: List[str] = dataclasses.field(default_factory=lambda: ["first", "last"])
    scale: Optional[str] = "tensor"
    init: str = "sign"
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    mnist1d_samples: int = 5000
    data_dir: Optional[str] = None
    download: Optional[bool] = None
    tensorboard: bool = True
    threads: Optional[int] = None
    preset: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "config") -> "BenchConfig":
        """Build from a mapping (YAML/JSON); unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of options, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validation
    def validate(self) -> "BenchConfig":
        """Check every field; raise ``ValueError`` naming the option and the value."""
        def bad(opt, msg):
            raise ValueError(f"--{opt.replace('_', '-')}: {msg}")

        def pos_int(opt, v, allow_none=False):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(opt, f"must be a positive integer, got {v!r}")

        try:
            canonical_name(self.dataset)
        except ValueError:
            bad("dataset", f"unknown data set {self.dataset!r}; valid: {', '.join(DATASETS)}")
        if str(self.model).strip().lower().replace("-", "_") not in MODELS:
            bad("model", f"unknown model {self.model!r}; valid: {', '.join(sorted(MODELS))}")
        if not isinstance(self.model_args, dict):
            bad("model_args", f"must be a mapping, got {self.model_args!r}")
        if isinstance(self.optimizers, str):
            self.optimizers = [s for s in self.optimizers.split(",") if s.strip()]
        if not self.optimizers:
            bad("optimizers", "needs at least one optimizer")
        self.optimizers = [get_spec(n).name for n in self.optimizers]  # raises with valid names
        if len(set(self.optimizers)) != len(self.optimizers):
            bad("optimizers", f"names repeated: {self.optimizers}")
        if not isinstance(self.optimizer_args, dict):
            bad("optimizer_args", f"must be a mapping {{optimizer: {{key: value}}}}, got {self.optimizer_args!r}")
        self.optimizer_args = {get_spec(k).name: dict(v or {}) for k, v in self.optimizer_args.items()}
        pos_int("epochs", self.epochs)
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            self.seeds = list(range(self.seeds))
        if (not isinstance(self.seeds, (list, tuple)) or not self.seeds
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds)):
            bad("seeds", f"must be a count or a non-empty list of non-negative integers, got {self.seeds!r}")
        self.seeds = list(self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            bad("seeds", f"seeds repeated: {self.seeds}")
        pos_int("batch_size", self.batch_size)
        pos_int("eval_batch_size", self.eval_batch_size)
        if self.lr is not None:
            if isinstance(self.lr, dict):
                self.lr = {get_spec(k).name: v for k, v in self.lr.items()}
                vals = list(self.lr.values())
            else:
                vals = [self.lr]
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    bad("lr", f"must be a finite number >= 0 (or name=value pairs), got {self.lr!r}")
        if self.tune not in (None, "lr"):
            bad("tune", f"only 'lr' can be tuned, got {self.tune!r}")
        if self.tune and self.lr is not None:
            bad("tune", "--tune lr and --lr are exclusive")
        if self.val_fraction is not None and (
                not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1):
            bad("val_fraction", f"must be in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.target_acc, (int, float)) or not 0 < self.target_acc <= 1:
            bad("target_acc", f"must be a fraction in (0, 1], got {self.target_acc!r}")
        if self.loss not in LOSSES:
            bad("loss", f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if isinstance(self.keep, str):
            self.keep = [] if self.keep.lower() in ("", "none") else self.keep.split(",")
        if not isinstance(self.keep, (list, tuple)) or set(self.keep) - {"first", "last"}:
            bad("keep", f"must be a subset of first,last (or none), got {self.keep!r}")
        self.keep = list(self.keep)
        if isinstance(self.scale, str) and self.scale.lower() == "none":
            self.scale = None
        if self.scale not in (None, "tensor", "channel"):
            bad("scale", f"must be none, tensor or channel, got {self.scale!r}")
        if self.init not in ("sign", "uniform"):
            bad("init", f"must be sign or uniform, got {self.init!r}")
        pos_int("max_train", self.max_train, allow_none=True)
        pos_int("max_test", self.max_test, allow_none=True)
        if isinstance(self.mnist1d_samples, bool) or not isinstance(self.mnist1d_samples, int) \
                or self.mnist1d_samples < 10:
            bad("mnist1d_samples", f"must be an integer >= 10, got {self.mnist1d_samples!r}")
        pos_int("threads", self.threads, allow_none=True)
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
