"""The ``pmptrain`` command line: ``pmptrain bench`` and ``pmptrain train``.

``main(argv=None)`` is the console script (``setup.cfg``: ``pmptrain = pmptrain.bench.cli:main``)
and ``python -m pmptrain`` / ``torchrun -m pmptrain``. See ``docs/cli.md`` and ``pmptrain bench
--help``. Precedence of settings: built-in defaults < ``--preset`` < ``--config`` file < explicit
command-line options. Returns the exit status (0 ok, 2 bad arguments or data, 1 other failure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .lm import LMConfig
from .registry import OPTIMIZERS, UnknownOptimizerError, get_spec
from .config import DEFAULT_OPTIMIZERS, BenchConfig
from .losses import LOSSES
from .records import check_out_dir
from .schema import MAX_YAML_BYTES, load_yaml

__all__ = ["main", "PRESETS", "build_parser"]

#: The Li & Hao notebooks per data set: (model, epochs, gamma, loss of the binary / ternary
#: notebook, training images kept out of 60000 / 50000 / 73257 (5000 held out as validation),
#: target accuracy).
_LIHAO_DATA = {
    "mnist": ("ref_mlp", 250, 0.95, ("squared-hinge", "cross-entropy"), 5000 / 60000, 0.95),
    "cifar10": ("ref_vgg", 500, 0.98, ("squared-hinge", "squared-hinge"), 5000 / 50000, 0.8),
    "svhn": ("ref_vgg_svhn", 200, 0.95, ("squared-hinge", "squared-hinge"), 5000 / 73257, 0.9),
}


def _lihao(levels: str, data: str) -> Dict[str, Any]:
    """The preset of one Li & Hao notebook (``levels`` binary/ternary, ``data`` mnist/cifar10/svhn)."""
    model, epochs, gamma, losses, val, target = _LIHAO_DATA[data]
    ternary = levels == "ternary"
    loss = losses[ternary]
    model_args: Dict[str, Any] = {"bn_init": "reference"}
    if model != "ref_mlp":
        model_args["order"] = "reference"
    opt = f"{levels}-msa"
    args: Dict[str, Any] = {"rho": 0.5, "decay": 0.999, "gamma": gamma, "acc_init": 1e-6,
                            "acc_init_mode": "uniform"}
    if ternary:
        args.update(lam=1e-7, lam_mode="absolute", wrong_set="sign")
    net = {"ref_mlp": "ref_mlp 784-2048x3-10", "ref_vgg": "ref_vgg (C128..FC1024)",
           "ref_vgg_svhn": "ref_vgg_svhn (half conv widths)"}[model]
    doc = (f"Li & Hao (ICML 2018) {levels} {data} notebook: {net}, every layer {levels} (no scale, "
           f"uniform codes), BN init N(0,1) eps 1e-4{', pool before BN' if model != 'ref_mlp' else ''}, "
           f"{opt} rho 0.5{' (their 0.25 full-square), lambda 1e-7 absolute, wrong set W != sign(M)' if ternary else ''}, "
           f"decay 0.999, gamma {gamma}, M_0 ~ U(+-1e-6), {loss}, batch 100, {epochs} epochs, "
           f"5000 training images held out; final-epoch test accuracy, density over all trainable parameters")
    return {
        "_doc": doc, "dataset": data, "model": model, "model_args": model_args, "optimizers": [opt],
        "optimizer_args": {opt: args}, "batch_size": 100, "loss": loss, "keep": [], "scale": None,
        "init": "uniform", "epochs": epochs, "val_fraction": val, "density_convention": "trainable",
        "seeds": [0], "target_acc": target,
    }


#: Named protocols: a partial :class:`~pmptrain.bench.config.BenchConfig` each.
PRESETS: Dict[str, Dict[str, Any]] = {
    "mnist1d-default": {
        "_doc": "the embedded default: MNIST-1D, mlp, sgd/adam/emsa/binary-msa/binaryconnect, "
                "20 epochs, 3 seeds (~2 min on 2 cores)",
    },
    "resnet-fmnist": {
        "_doc": "ResNet-18 (width 16) on Fashion-MNIST: sgd (momentum 0.9, wd 5e-4) / adamw / emsa, "
                "batch 64, 4 epochs of 6400 images (400 steps), 3 seeds (~25 min on 2 cores)",
        "dataset": "fashion-mnist", "model": "resnet", "model_args": {"width": 16},
        "optimizers": ["sgd", "adamw", "emsa"], "optimizer_args": {"sgd": {"weight_decay": 5e-4}},
        "batch_size": 64, "max_train": 6400, "epochs": 4, "seeds": [0, 1, 2], "target_acc": 0.8,
    },
    # Li & Hao (ICML 2018): the released notebooks' settings (LiQianxiao/discrete-MSA
    # mnist_fc_*.ipynb, cifar10_conv_*.ipynb, svhn_conv_*.ipynb; layers.py, train.py, utils.py),
    # docs/discrete.md section 3. Every option with a reference value is pinned here.
    **{f"lihao-{levels}-{data}": _lihao(levels, data) for data in ("mnist", "cifar10", "svhn")
       for levels in ("binary", "ternary")},
}

# options that may differ when resuming a bench directory
_RESUMABLE = {"epochs", "tensorboard", "threads", "data_dir", "download"}


def _optimizer_table() -> str:
    lines = ["optimizers (--optimizers; '--lr' sets the column 'hp', '--tune lr' tries 'grid'):"]
    for s in OPTIMIZERS.values():
        w = "float" if s.levels is None else f"discrete {s.levels}"
        grid = ", ".join(f"{v:g}" for v in s.tune_grid)
        lines.append(f"  {s.name:<15} {w:<17} hp {s.lr_key}={s.default_lr:g}  grid [{grid}]  "
                     f"{s.description}")
    return "\n".join(lines)


def _preset_table() -> str:
    return "presets (--preset):\n" + "\n".join(f"  {k:<20} {v['_doc']}" for k, v in PRESETS.items())


_EPILOG = """\
{optimizers}

{presets}

outputs (in --out, default runs/<timestamp>):
  config.json                 config, versions (python/torch/pmptrain), git hash, world size
  results.txt, results.json, results.csv
                              the table: final/best test accuracy (median [min-max] over seeds),
                              epochs and seconds to --target-acc, median step time and its ratio
                              to SGD in the same bench, peak RSS, optimizer-state size, and the
                              seconds every optimizer takes to reach every optimizer's final
                              accuracy (times on --clock: wall or cpu)
  acc_vs_epoch.png, acc_vs_seconds.png   one line per optimizer, band = seed spread
  runs/<opt>[/<hp>=<v>]/seed<k>/{{checkpoint.pt,run.json}}   per-run record, atomic checkpoints
  tensorboard/<opt>[/<hp>=<v>]/seed<k>/   TensorBoard logs (train/test loss & accuracy, step
                              time, PMP diagnostics: Hamiltonian gain, flip ratio, density)

distributed: torchrun --nproc-per-node N -m pmptrain bench ...  (gloo; each global batch of
--batch-size is split across ranks; only rank 0 writes and prints)

examples:
  pmptrain bench
  pmptrain bench --dataset fashion-mnist --model mlp --optimizers sgd,adam,emsa --epochs 5 --seeds 3
  pmptrain bench --optimizers sgd,emsa --tune lr
  pmptrain bench --preset lihao-binary-mnist
  pmptrain bench --preset resnet-fmnist
  pmptrain bench --model gpt --optimizers adamw,emsa-transformer,muon
  pmptrain bench --task finetune      (fine-tuning by control: LoRA, parallel, nonlinear, binary
                                       controls on a pretrained GPT; see --task finetune --help)
  pmptrain train --config experiments/configs/X.yaml --resume runs/X
"""


def _yaml_value(text: str, opt: str):
    return load_yaml(text, f"{opt} {text!r}")


def _parse_seeds(text: str):
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return int(text)
    except ValueError:
        raise ValueError(f"--seeds: expected a count (3) or a list (0,1,2), got {text!r}") from None


def _parse_lr(text: str):
    try:
        if "=" in text:
            out = {}
            for part in text.split(","):
                k, _, v = part.partition("=")
                name = get_spec(k.strip()).name
                if name in out:
                    raise ValueError(f"--lr: {name} given twice in {text!r}")
                out[name] = float(v)
            return out
        return float(text)
    except ValueError as e:
        if str(e).startswith("--"):
            raise
        raise ValueError(f"--lr: expected a number or name=value pairs (emsa=0.5,sgd=0.1), got {text!r}") from None


def _parse_opt_args(items: List[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, eq, val = item.partition("=")
        name, dot, arg = key.partition(".")
        if not eq or not dot or not name or not arg:
            raise ValueError(f"--opt-arg: expected OPTIMIZER.KEY=VALUE (e.g. emsa.rho=2), got {item!r}")
        name = get_spec(name).name
        if arg.strip() in out.get(name, {}):
            raise ValueError(f"--opt-arg {name}.{arg.strip()}: given twice")
        out.setdefault(name, {})[arg.strip()] = _yaml_value(val, "--opt-arg")
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # unset options do not override preset/config values
    g = p.add_argument_group("what to run")
    g.add_argument("--task", default=S, choices=["classify", "robust", "finetune"],
                   help="classify (default): compare optimizers; robust: adversarial training methods x "
                        "optimizers (see 'pmptrain bench --task robust --help', docs/robust.md); finetune: "
                        "fine-tuning by control ('pmptrain bench --task finetune --help', docs/control.md)")
    g.add_argument("--preset", default=S, choices=sorted(PRESETS), metavar="NAME",
                   help=f"start from a named protocol ({', '.join(PRESETS)}); see below")
    g.add_argument("--dataset", default=S,
                   help="mnist1d (default; generated locally), mnist, fashion-mnist, cifar10, svhn")
    g.add_argument("--model", default=S,
                   help="model name: mlp (default), cnn_small, ref_mlp, ref_vgg, ref_vgg_svhn, "
                        "restanh, emsa_cnn, resnet_small, resnet8, resnet20, resnet (ResNet-18), mobilenet, "
                        "gpt (the language-model bench, see below)")
    g.add_argument("--model-args", default=S, metavar="YAML",
                   help="builder keyword arguments as a YAML mapping, e.g. "
                        "'{widths: [512, 512], batchnorm: true}' (default {})")
    g.add_argument("--optimizers", default=S, metavar="LIST",
                   help=f"comma-separated names (default {','.join(DEFAULT_OPTIMIZERS)}); see below")
    g.add_argument("--opt-arg", action="append", default=S, metavar="OPT.KEY=VALUE",
                   help="override an optimizer keyword, e.g. emsa.rho=2 or binary-msa.gamma=0.95 "
                        "(repeatable; VALUE is parsed as YAML)")
    g.add_argument("--loss", default=S, choices=sorted(LOSSES),
                   help="training loss (default cross-entropy); squared-hinge uses one-hot ±1 targets")
    g = p.add_argument_group("training budget")
    g.add_argument("--epochs", type=int, default=S, help="epochs per run (default 20)")
    g.add_argument("--seeds", default=S, metavar="N|LIST",
                   help="a count (3 -> seeds 0,1,2) or a comma list of seeds (default 3)")
    g.add_argument("--batch-size", type=int, default=S,
                   help="global batch size, split across ranks under torchrun (default 128)")
    g.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=S,
                   help="permute the training set every epoch, seeded by (seed, epoch) (default on); "
                        "--no-shuffle feeds it in file order")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=S,
                   help="under torchrun: shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) "
                        "instead of wrapping it in DDP (default off; --model gpt: each block then the root, "
                        "required under torchrun)")
    g.add_argument("--lr", default=S, metavar="X|OPT=X,...",
                   help="each optimizer's step-size hyper-parameter (lr; rho for *-msa; for bop its lr "
                        "is the rate gamma): one value for all or per name (default: registry defaults)")
    g.add_argument("--tune", default=S, choices=["lr"],
                   help="try every value of each optimizer's grid; report the best (median final "
                        "validation accuracy over seeds) as 'best of grid'")
    g.add_argument("--val-fraction", type=float, default=S,
                   help="validation split of the training set (default 0.1 with --tune, else 0)")
    g.add_argument("--target-acc", type=float, default=S,
                   help="test accuracy (fraction) for epochs/seconds-to-target (default 0.6)")
    g = p.add_argument_group("discretisation (discrete optimizers only)")
    g.add_argument("--keep", default=S, metavar="first,last|none",
                   help="layers kept full precision (default first,last; 'none' = all discrete)")
    g.add_argument("--scale", default=S, choices=["none", "tensor", "channel"],
                   help="fixed scale alpha = mean|W| of the initial weights (default tensor)")
    g.add_argument("--init", default=S, choices=["sign", "uniform"],
                   help="initial codes: nearest grid value of W/mean|W| (sign, default) or uniform")
    g.add_argument("--density-convention", default=S, choices=["discrete", "trainable"],
                   help="denominator of the reported non-zero fraction: the discrete weights "
                        "(default) or all trainable parameters (Li & Hao's 'sparsity')")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=S, help="first directory searched for data files")
    g.add_argument("--download", action="store_true", default=S,
                   help="download missing data files (MD5-checked); default: only if "
                        "$PMPTRAIN_DOWNLOAD=1")
    g.add_argument("--max-train", type=int, default=S, help="use only the first N training examples")
    g.add_argument("--max-test", type=int, default=S, help="use only the first N test examples")
    g.add_argument("--mnist1d-samples", type=int, default=S,
                   help="size of the generated MNIST-1D set, 80/20 train/test (default 5000)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="DIR", help="output directory (default runs/<timestamp>)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the bench in DIR exactly where it stopped (finished runs are "
                        "kept; --epochs may be raised)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=S,
                   help="write TensorBoard logs (default on)")
    g.add_argument("--threads", type=int, default=S,
                   help="torch.set_num_threads, at most 4 x the CPUs (default: torch's)")
    g.add_argument("--clock", default=S, choices=["wall", "cpu"],
                   help="the training clock of step times and seconds to target: wall (time.perf_counter, "
                        "default) or cpu (process CPU time, time.process_time: not inflated by other processes' "
                        "load on a shared machine; needs --threads 1); recorded in results.json and the tables")
    g.add_argument("--dry-run", action="store_true", default=False,
                   help="check every setting and the output directory, print the resolved configuration "
                        "as JSON and exit (0 valid, 2 refused) without loading data, training or writing")
    g = p.add_argument_group(
        "language-model bench (--model gpt; --dataset pysrc|fortunes|FILE; default optimizers "
        "adamw,emsa-transformer,emsa-costate; batch 16 sequences; --seeds, --lr, --opt-arg, --threads, --out as above)")
    g.add_argument("--steps", type=int, default=S, help="optimizer steps per run (default 200)")
    g.add_argument("--seq-len", type=int, default=S, help="tokens (bytes) per sequence (default 128)")
    g.add_argument("--eval-every", type=int, default=S,
                   help="gpt: validation every N steps (default 20); classifiers: also the test accuracy every "
                        "N steps (not timed), for a finer time to every optimizer's final accuracy (default: "
                        "after each epoch only)")
    g.add_argument("--warmup", type=float, default=S, help="linear warmup, fraction of the steps (default 0.1)")
    g.add_argument("--clip", type=float, default=S, help="gradient-norm clipping, 0 = off (default 1.0)")
    g.add_argument("--max-bytes", type=int, default=S, help="corpus size in bytes (default 2000000)")
    g.add_argument("--target-loss", type=float, default=S,
                   help="validation loss for steps/seconds-to-target (default: the first optimizer's "
                        "median final loss)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pmptrain``."""
    epilog = _EPILOG.format(optimizers=_optimizer_table(), presets=_preset_table())
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="pmptrain", formatter_class=fmt, epilog=epilog,
                                description="Benchmark and train networks with Pontryagin-maximum-"
                                            "principle optimizers.")
    sub = p.add_subparsers(dest="command", metavar="{bench,train}")
    b = sub.add_parser("bench", formatter_class=fmt, epilog=epilog,
                       help="compare optimizers (default: MNIST-1D, ~2 minutes offline)",
                       description="Train every optimizer x seed on one data set and model, then "
                                   "write a results table (text/JSON/CSV) and accuracy plots.")
    _add_common(b)
    t = sub.add_parser("train", formatter_class=fmt, epilog=epilog,
                       help="run a bench described by a YAML config file",
                       description="Like 'bench', with the settings read from a YAML file whose "
                                   "keys are the option names (dataset, model, model_args, "
                                   "optimizers, optimizer_args, epochs, seeds, batch_size, lr, "
                                   "tune, target_acc, loss, keep, scale, init, ...). Command-line "
                                   "options override the file.")
    t.add_argument("--config", default=None, metavar="X.yaml", help="the YAML config (required "
                   "unless --resume names a bench directory)")
    _add_common(t)
    return p


def _cli_overrides(ns: argparse.Namespace) -> Dict[str, Any]:
    d = {k: v for k, v in vars(ns).items()
         if k not in ("command", "config", "out", "resume", "preset", "dry_run", "task")}
    if "model_args" in d:
        d["model_args"] = _yaml_value(d["model_args"], "--model-args")
        if not isinstance(d["model_args"], dict):
            raise ValueError(f"--model-args: expected a YAML mapping, got {ns.model_args!r}")
    if "opt_arg" in d:
        d["optimizer_args"] = _parse_opt_args(d.pop("opt_arg"))
    if "optimizers" in d:
        d["optimizers"] = [s.strip() for s in d["optimizers"].split(",") if s.strip()]
        for n in d["optimizers"]:
            get_spec(n)
    if "seeds" in d:
        d["seeds"] = _parse_seeds(d["seeds"])
    if "lr" in d:
        d["lr"] = _parse_lr(d["lr"])
    return d


def _load_yaml(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: file not found: {path}")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"--config: {path} is larger than {MAX_YAML_BYTES} bytes; a configuration is a few lines")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config: cannot read {path}: {e}") from None
    d = load_yaml(text, f"--config {path}") or {}
    if not isinstance(d, dict):
        raise ValueError(f"--config: {path} must hold a mapping of options")
    bad = [k for k in d if not isinstance(k, str)]
    if bad:
        raise ValueError(f"--config: {path}: option names must be strings, got {bad!r}")
    return d


def _merge(base: Dict[str, Any], upd: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        k = k.replace("-", "_")
        if k == "optimizer_args" and isinstance(v, dict) and isinstance(out.get(k), dict):
            merged = {n: dict(a) for n, a in out[k].items()}
            for n, a in v.items():
                merged.setdefault(n, {}).update(a or {})
            out[k] = merged
        else:
            out[k] = v
    return out


def _preset(name: str) -> Dict[str, Any]:
    d = {k: v for k, v in PRESETS[name].items() if not k.startswith("_")}
    d["preset"] = name
    return d


def _drop_preset_only_args(settings: Dict[str, Any], file_cfg: Dict[str, Any], cli: Dict[str, Any]) -> None:
    """A preset's overrides of optimizers that the run leaves out are dropped (``--preset
    resnet-fmnist --optimizers emsa`` is a legitimate choice); the schema refuses overrides for
    optimizers not run only when the user gave them (``--opt-arg adam.lr=1`` with sgd alone)."""
    from .lm import DEFAULT_LM_OPTIMIZERS

    names = settings.get("optimizers", DEFAULT_LM_OPTIMIZERS if settings.get("model") == "gpt" else DEFAULT_OPTIMIZERS)
    try:
        run = {get_spec(n).name for n in (names.split(",") if isinstance(names, str) else names)}
        explicit = {get_spec(n).name for src in (file_cfg, cli)
                    for n in (src.get("optimizer_args") or {})}
    except (UnknownOptimizerError, TypeError, AttributeError):
        return  # the schema refuses these with the option named
    settings["optimizer_args"] = {n: a for n, a in settings["optimizer_args"].items()
                                  if get_spec(n).name in run or get_spec(n).name in explicit}


def _resolve(ns: argparse.Namespace) -> Tuple[BenchConfig, Path, bool]:
    cli = _cli_overrides(ns)
    settings: Dict[str, Any] = {}
    preset = getattr(ns, "preset", None)
    file_cfg: Dict[str, Any] = {}
    if getattr(ns, "config", None):
        file_cfg = _load_yaml(ns.config)
        preset = file_cfg.pop("preset", None) if preset is None else preset
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    if preset:
        settings = _merge(settings, _preset(preset))
    settings = _merge(settings, file_cfg)
    settings = _merge(settings, cli)
    if preset and isinstance(settings.get("optimizer_args"), dict):
        _drop_preset_only_args(settings, file_cfg, cli)

    if ns.resume:
        out = Path(ns.resume)
        stored_path = out / "config.json"
        if not stored_path.is_file():
            raise ValueError(f"--resume: {out} is not a bench directory (no config.json)")
        try:
            if stored_path.stat().st_size > MAX_YAML_BYTES:
                raise ValueError(f"larger than {MAX_YAML_BYTES} bytes")
            stored_all = json.loads(stored_path.read_text(encoding="utf-8"))
            if not isinstance(stored_all, dict) or not isinstance(stored_all.get("config"), dict):
                raise ValueError("no 'config' mapping")
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"--resume: {stored_path} is not a bench's config.json ({e})") from None
        if stored_all.get("kind") == "language-model":
            raise ValueError(f"--resume: {out} holds a language-model bench (--model gpt), which runs "
                             "start to finish (200 steps take minutes); run it again instead")
        stored = stored_all["config"]
        if ns.out and Path(ns.out) != out:
            raise ValueError("--out: cannot differ from --resume DIR")
        cfg = BenchConfig.from_dict(stored, where=str(stored_path))
        if file_cfg or cli or preset:
            given = BenchConfig.from_dict(_merge(stored, settings), where="--config/options")
            diff = [k for k in stored if k not in _RESUMABLE and k in settings
                    and getattr(given, k) != getattr(cfg, k)]
            if diff:
                raise ValueError(f"--resume: options {diff} differ from the bench in {out}; only "
                                 f"{sorted(_RESUMABLE)} may change when resuming")
            cfg = given
        if cfg.epochs < int(stored.get("epochs", cfg.epochs)):
            raise ValueError(f"--epochs: {cfg.epochs} is fewer than the {stored['epochs']} epochs of the bench in "
                             f"{out}; a resumed bench can only be extended (use a new --out for a shorter one)")
        return cfg, out, True
    if ns.command == "train" and not getattr(ns, "config", None):
        raise ValueError("--config: 'pmptrain train' needs --config X.yaml (or --resume DIR)")
    if settings.get("model") == "gpt":
        if "dataset" not in settings:
            settings["dataset"] = "pysrc"
        cfg = LMConfig.from_dict(settings, where="options")
        out = Path(ns.out) if ns.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        return cfg, out, False
    cfg = BenchConfig.from_dict(settings, where="options")
    out = Path(ns.out) if ns.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return cfg, out, False


def _check_out_dir(out: Path) -> None:
    """:func:`pmptrain.bench.records.check_out_dir` (a ``ValueError`` naming ``--out``)."""
    check_out_dir(out)


def _pop_task(args: List[str]) -> Tuple[str, List[str]]:
    """``--task NAME`` / ``--task=NAME`` of ``pmptrain bench`` (default ``classify``), removed from ``args``."""
    if not args or args[0] != "bench":
        return "classify", args
    out, task, i = [], "classify", 0
    while i < len(args):
        a = args[i]
        if a == "--task" and i + 1 < len(args):
            task, i = args[i + 1], i + 2
            continue
        if a.startswith("--task="):
            task, i = a.split("=", 1)[1], i + 1
            continue
        out.append(a)
        i += 1
    return task, out


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``pmptrain`` command; returns the exit status."""
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-") and args[0] not in ("-h", "--help"):
        args = ["bench"] + args  # `pmptrain` alone runs the default bench
    task, args = _pop_task(args)
    if task not in ("classify", "robust", "finetune"):
        print(f"pmptrain bench: error: --task: expected classify, robust or finetune, got {task!r}", file=sys.stderr)
        return 2
    if task == "robust":  # adversarial robustness: its own options (pmptrain bench --task robust --help)
        from ..robust.bench import main as robust_main

        return robust_main(args[1:])
    if task == "finetune":  # fine-tuning by control: its own options (pmptrain bench --task finetune --help)
        from .finetune import main as finetune_main

        return finetune_main(args[1:])
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help()
        return 0

    from .ranks import run_ranked
    from .sweep import run_bench

    try:
        cfg, out, resume = _resolve(ns)
        _check_out_dir(out)
    except (ValueError, UnknownOptimizerError) as e:
        print(f"pmptrain {ns.command}: error: {e}", file=sys.stderr)
        return 2
    if ns.dry_run:
        print(json.dumps(cfg.to_dict(), indent=1, default=str))
        return 0

    def run(out: Path) -> None:
        if isinstance(cfg, LMConfig):
            from .lm import run_lm_bench

            run_lm_bench(cfg, out)
        else:
            run_bench(cfg, out, resume=resume)

    return run_ranked(f"pmptrain {ns.command}", out, run)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
