"""``pmptrain bench --task robust``: adversarial training methods × optimizers, evaluated by our PGD-20,
the library's AutoAttack (when the ``robust`` extra is installed) and the closed-loop controller.

Protocol (docs/robust.md §5): every (method, optimizer, seed) trains from the same initialisation
with its own epoch budget; after each epoch the clean and PGD-20 accuracy of ``--eval-n`` test
examples are recorded against cumulative training seconds (evaluation excluded). Time to target: the
first epoch at which a run reaches PGD-10 AT's final PGD-20 accuracy (same optimizer, median over
seeds) within ``--tol-robust`` points with clean accuracy within ``--tol-clean`` points, in seconds of
training, divided by PGD-10 AT's total training seconds. Outputs: ``results.json``, ``results.csv``,
``results.txt``, ``robust_vs_seconds.png`` and TensorBoard logs, in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from . import attacks as A
from . import library
from .closed_loop import ClosedLoopController
from .trainers import TRAINERS

__all__ = ["main", "build_parser", "METHODS", "run"]

METHODS = ("standard", "pgd-at", "free", "fast", "yopo", "trades", "trades-yopo")
_LABEL = {"standard": "standard", "pgd-at": "PGD-{k} AT", "free": "Free (m={replays})", "fast": "Fast (FGSM-RS)",
          "yopo": "YOPO-{m}-{n}", "trades": "TRADES-{k}", "trades-yopo": "TRADES-YOPO-{m}-{n}"}
ROW_FIELDS = ("method", "optimizer", "epochs", "seeds", "clean_median", "clean_min", "clean_max",
              "pgd20_median", "pgd20_min", "pgd20_max", "autoattack_median", "train_seconds_median",
              "time_vs_pgd_at", "passes_vs_pgd_at", "first_layer_passes", "seconds_to_target_median",
              "target_vs_pgd_at_total", "reached", "cl_clean_base", "cl_clean", "cl_pgd20_base", "cl_pgd20_transfer",
              "cl_autoattack_base", "cl_autoattack_transfer", "cl_pgd20_adaptive", "seconds_full", "seconds_first", "seconds_step")


# ------------------------------------------------------------------------------------ models
class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., ECCV 2016): BN-ReLU-conv3×3-BN-ReLU-conv3×3 + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = (nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        s = self.short(o) if self.short is not None else x
        o = self.conv1(o)
        return self.conv2(torch.relu(self.bn2(o))) + s


def preact_resnet18(input_shape=(3, 32, 32), num_classes: int = 10, width: int = 64) -> nn.Sequential:
    """PreAct ResNet-18 (the robustness literature's CIFAR-10 network), as an ``nn.Sequential`` so
    that the closed-loop controller can act between its stages; the first layer is ``"0"``."""
    c, w = input_shape[0], width
    layers: List[nn.Module] = [nn.Conv2d(c, w, 3, 1, 1, bias=False)]
    cin = w
    for i, mult in enumerate((1, 2, 4, 8)):
        for j in range(2):
            layers.append(PreActBlock(cin, w * mult, 2 if (j == 0 and i > 0) else 1))
            cin = w * mult
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def small_cnn(input_shape, num_classes: int = 10) -> nn.Sequential:
    """Conv(16)-ReLU-Pool-Conv(32)-ReLU-Pool-FC(100)-ReLU-FC (1-D or 2-D by the input shape)."""
    from ..bench.models import cnn_small

    return cnn_small(input_shape, num_classes, channels=(16, 32), hidden=100)


# ------------------------------------------------------------------------------------ data
def load(name: str, data_dir: Optional[str], download: bool, max_train: Optional[int], max_test: Optional[int],
         log) -> Dict[str, Any]:
    """Inputs in pixel units [0, 1] (image sets) or MNIST-1D's standardised units (no box)."""
    from ..bench.data import DatasetNotFoundError, load_dataset

    note = ""
    try:
        ds = load_dataset(name, data_dir=data_dir, download=download or None, val_fraction=0.0)
    except DatasetNotFoundError:
        if name not in ("fashion-mnist", "fmnist"):
            raise
        note = "Fashion-MNIST not found (apt-get install dataset-fashion-mnist, or --download); fell back to MNIST-1D"
        log(f"note: {note}")
        ds = load_dataset("mnist1d", val_fraction=0.0)
    mean = torch.tensor(ds.meta.get("mean", (0.0,))).view(1, -1, *([1] * (len(ds.input_shape) - 1)))
    std = torch.tensor(ds.meta.get("std", (1.0,))).view_as(mean)
    image = ds.name != "mnist1d"
    fix = (lambda t: (t * std + mean).clamp(0, 1)) if image else (lambda t: t)
    tx, ty, ex, ey = fix(ds.train_x), ds.train_y, fix(ds.test_x), ds.test_y
    if max_train:
        tx, ty = tx[:max_train], ty[:max_train]
    if max_test:
        ex, ey = ex[:max_test], ey[:max_test]
    big = ds.name in ("cifar10", "svhn")
    return {"name": ds.name, "train": (tx, ty), "test": (ex, ey), "shape": tuple(ds.input_shape),
            "classes": ds.num_classes, "bounds": (0.0, 1.0) if image else None,
            "eps": 8 / 255 if big else 0.1, "model": "preact_resnet18" if big else "small_cnn", "note": note}


# ------------------------------------------------------------------------------------ one run
def _optimizer(name: str, model: nn.Module, lr: Optional[float]):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05 if lr is None else lr, momentum=0.9, weight_decay=5e-4)
    if name == "emsa":
        import pmptrain

        return pmptrain.EMSA(model, lr=1.0 if lr is None else lr)
    raise ValueError(f"--optimizers: expected sgd and/or emsa, got {name!r}")


def _trainer(method: str, model, opt, cfg, first: str):
    kw = {"eps": cfg.eps, "bounds": cfg.bounds, "norm": cfg.norm}
    if method == "pgd-at":
        return TRAINERS[method](model, opt, steps=cfg.pgd_k, **kw)
    if method == "free":
        return TRAINERS[method](model, opt, replays=cfg.free_m, **kw)
    if method == "trades":
        return TRAINERS[method](model, opt, steps=cfg.pgd_k, beta=cfg.beta, **kw)
    if method == "yopo":
        return TRAINERS[method](model, opt, first=first, m=cfg.yopo_m, n=cfg.yopo_n, **kw)
    if method == "trades-yopo":
        return TRAINERS[method](model, opt, first=first, m=cfg.yopo_m, n=cfg.yopo_n, beta=cfg.beta, **kw)
    return TRAINERS[method](model, opt, **kw)


def _epochs(method: str, cfg) -> int:
    if method == "free":
        return max(1, round(cfg.epochs / cfg.free_m))
    if method in ("yopo", "trades-yopo"):
        return cfg.yopo_epochs or max(1, cfg.epochs // 2)
    return cfg.epochs


def _pgd20(cfg):
    return lambda model, x, y: A.pgd(model, x, y, cfg.eps, alpha=cfg.eps / 4, steps=20, norm=cfg.norm,
                                     bounds=cfg.bounds, generator=torch.Generator().manual_seed(0))


def run_one(cfg, data, method: str, optname: str, seed: int, writer=None, log=print) -> Dict[str, Any]:
    from ..bench.data import make_loader

    torch.manual_seed(seed)
    model = preact_resnet18(data["shape"], data["classes"]) if data["model"] == "preact_resnet18" else \
        small_cnn(data["shape"], data["classes"])
    opt = _optimizer(optname, model, cfg.lr.get(optname))
    tr = _trainer(method, model, opt, cfg, "0")
    tx, ty = data["train"]
    ex, ey = data["test"]
    ex, ey = ex[:cfg.eval_n], ey[:cfg.eval_n]
    hist, secs = [], 0.0
    for epoch in range(_epochs(method, cfg)):
        model.train()
        t0 = time.perf_counter()
        losses = [tr.step(xb, yb) for xb, yb in make_loader(tx, ty, cfg.batch_size, seed=seed, epoch=epoch)]
        secs += time.perf_counter() - t0
        model.eval()
        clean = A.accuracy(model, ex, ey)
        rob = A.robust_accuracy(model, ex, ey, _pgd20(cfg))
        h = {"epoch": epoch + 1, "seconds": secs, "train_loss": statistics.fmean(losses), "clean": clean, "pgd20": rob}
        hist.append(h)
        if writer is not None:
            for k in ("train_loss", "clean", "pgd20"):
                writer.add_scalar(f"{method}/{optname}/seed{seed}/{k}", h[k], epoch + 1)
        log(f"  {method:<12} {optname:<5} seed {seed} epoch {epoch + 1}: loss {h['train_loss']:.3f} clean "
            f"{100 * clean:.1f}% pgd20 {100 * rob:.1f}% ({secs:.1f} s)")
    rec = {"method": method, "optimizer": optname, "seed": seed, "history": hist, "train_seconds": secs,
           "passes": dict(tr.passes), "seconds_split": dict(tr.seconds), "skipped_steps": tr.skipped_steps,
           "settings": _settings(method, tr)}
    model.eval()
    xs, ys = ex[:cfg.cl_n], ey[:cfg.cl_n]
    if cfg.autoattack and library.available():
        adv = library.art_autoattack(model, ex, ey, cfg.eps, cfg.norm, data["classes"], cfg.bounds)
        rec["autoattack"] = A.accuracy(model, adv, ey)
    if cfg.closed_loop:
        rec.update(_closed_loop(cfg, model, data, xs, ys))
    if hasattr(tr, "close"):
        tr.close()
    if hasattr(opt, "detach"):
        opt.detach()
    return rec


def _settings(method: str, tr) -> str:
    return _LABEL[method].format(k=getattr(tr, "steps", 0), replays=getattr(tr, "replays", 0),
                                 m=getattr(tr, "m", 0), n=getattr(tr, "n", 0))


def _closed_loop(cfg, model, data, xs, ys) -> Dict[str, Any]:
    """Clean / transfer (attack the uncontrolled model, evaluate the controlled) / adaptive (PGD-20
    through the controller by BPDA) accuracy of the closed-loop controller on ``cl_n`` examples."""
    tx = data["train"][0][:cfg.cl_fit]
    layers = [str(i) for i, m in enumerate(model) if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d))][:1]
    ctl = ClosedLoopController(model, layers=layers, energy=cfg.cl_energy, bounds=cfg.bounds).fit(tx)
    pgd = _pgd20(cfg)
    adv = torch.cat([pgd(model, xs[i:i + 100], ys[i:i + 100]) for i in range(0, xs.shape[0], 100)])
    out = {"cl_clean": A.accuracy(ctl, xs, ys, batch_size=100), "cl_clean_base": A.accuracy(model, xs, ys),
           "cl_pgd20_transfer": A.accuracy(ctl, adv, ys, batch_size=100), "cl_pgd20_base": A.accuracy(model, adv, ys)}
    if cfg.autoattack and library.available():
        adv = library.art_autoattack(model, xs, ys, cfg.eps, cfg.norm, data["classes"], cfg.bounds)
        out["cl_autoattack_transfer"] = A.accuracy(ctl, adv, ys, batch_size=100)
        out["cl_autoattack_base"] = A.accuracy(model, adv, ys)
    if cfg.cl_adaptive:
        out["cl_pgd20_adaptive"] = A.robust_accuracy(ctl.bpda, xs, ys, pgd, batch_size=100, target=ctl)
    return out


# ------------------------------------------------------------------------------------ tables
def _med(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def aggregate(runs: List[Dict[str, Any]], cfg) -> List[Dict[str, Any]]:
    rows = []
    ref: Dict[str, Dict[str, float]] = {}
    for opt in cfg.optimizers:
        pr = [r for r in runs if r["method"] == "pgd-at" and r["optimizer"] == opt]
        if pr:
            ref[opt] = {"clean": _med([r["history"][-1]["clean"] for r in pr]),
                        "pgd20": _med([r["history"][-1]["pgd20"] for r in pr]),
                        "secs": _med([r["train_seconds"] for r in pr]),
                        "passes": _med([r["passes"]["forward"] + r["passes"]["backward"] for r in pr])}
    for method in cfg.methods:
        for opt in cfg.optimizers:
            rs = [r for r in runs if r["method"] == method and r["optimizer"] == opt]
            if not rs:
                continue
            fin = [r["history"][-1] for r in rs]
            rf = ref.get(opt)
            tts = []
            for r in rs:
                if rf is None:
                    break
                hit = [h["seconds"] for h in r["history"]
                       if h["pgd20"] >= rf["pgd20"] - cfg.tol_robust / 100 and h["clean"] >= rf["clean"] - cfg.tol_clean / 100]
                if hit:
                    tts.append(hit[0])
            secs = _med([r["train_seconds"] for r in rs])
            passes = _med([r["passes"]["forward"] + r["passes"]["backward"] for r in rs])
            row = {"method": method, "setting": rs[0]["settings"], "optimizer": opt, "epochs": len(rs[0]["history"]),
                   "seeds": len(rs),
                   "clean_median": _med([h["clean"] for h in fin]), "clean_min": min(h["clean"] for h in fin),
                   "clean_max": max(h["clean"] for h in fin),
                   "pgd20_median": _med([h["pgd20"] for h in fin]), "pgd20_min": min(h["pgd20"] for h in fin),
                   "pgd20_max": max(h["pgd20"] for h in fin),
                   "autoattack_median": _med([r.get("autoattack") for r in rs]),
                   "train_seconds_median": secs,
                   "time_vs_pgd_at": secs / rf["secs"] if rf else None,
                   "passes_vs_pgd_at": passes / rf["passes"] if rf else None,
                   "first_layer_passes": _med([r["passes"]["first_forward"] + r["passes"]["first_backward"] for r in rs]),
                   "seconds_to_target_median": _med(tts),
                   "target_vs_pgd_at_total": (_med(tts) / rf["secs"]) if (rf and tts) else None,
                   "reached": len(tts),
                   "seconds_full": _med([r["seconds_split"]["full"] for r in rs]),
                   "seconds_first": _med([r["seconds_split"]["first"] for r in rs]),
                   "seconds_step": _med([r["seconds_split"]["step"] for r in rs])}
            for k in ("cl_clean", "cl_pgd20_transfer", "cl_autoattack_transfer", "cl_pgd20_adaptive",
                      "cl_clean_base", "cl_pgd20_base", "cl_autoattack_base"):
                row[k] = _med([r.get(k) for r in rs])
            rows.append(row)
    return rows


def _p(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _x(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    head = ["method", "opt", "ep", "clean %", "PGD-20 %", "AA %", "time ×PGD-AT", "passes ×PGD-AT",
            "→target ×PGD-AT", "CL clean", "CL PGD-20 transfer", "CL AA transfer", "CL PGD-20 adaptive"]
    cl = lambda r, base, k: "-" if r[k] is None else f"{_p(r[base])}→{_p(r[k])}"  # noqa: E731
    lines = []
    for r in rows:
        rng = lambda k: (f"{_p(r[k + '_median'])} [{_p(r[k + '_min'])}-{_p(r[k + '_max'])}]"  # noqa: E731
                         if r["seeds"] > 1 else _p(r[k + "_median"]))
        tgt = _x(r["target_vs_pgd_at_total"]) + ("" if r["reached"] == r["seeds"] else f" ({r['reached']}/{r['seeds']})")
        lines.append([r["setting"], r["optimizer"], str(r["epochs"]), rng("clean"), rng("pgd20"),
                      _p(r["autoattack_median"]), _x(r["time_vs_pgd_at"]), _x(r["passes_vs_pgd_at"]), tgt,
                      cl(r, "cl_clean_base", "cl_clean"), cl(r, "cl_pgd20_base", "cl_pgd20_transfer"),
                      cl(r, "cl_autoattack_base", "cl_autoattack_transfer"), cl(r, "cl_pgd20_base", "cl_pgd20_adaptive")])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines]
    c = meta["config"]
    out += ["", f"{meta['dataset']} / {meta['model']}, eps {c['eps']:.4g} ({c['norm']}), batch {c['batch_size']}, "
            f"seeds {c['seeds']}; accuracies on {c['eval_n']} test examples (closed loop: {c['cl_n']}); "
            f"medians [min-max] over seeds; time = training seconds (evaluation excluded); "
            f"→target = seconds to PGD-AT's final PGD-20 within {c['tol_robust']} points (clean within "
            f"{c['tol_clean']}) / PGD-AT's total seconds, same optimizer. CL a→b: the model without → with the "
            f"closed-loop controller on the first {c['cl_n']} examples (transfer: the attack sees the uncontrolled "
            f"model; adaptive: PGD-20 through the controller by BPDA, a→b against the uncontrolled PGD-20). AA = AutoAttack "
            f"({'ART, APGD-CE + APGD-DLR' if c['autoattack'] and library.available() else 'not run: the robust extra is missing or --no-autoattack'})."]
    if meta.get("note"):
        out.append("note: " + meta["note"])
    return "\n".join(out)


def plot(runs: List[Dict[str, Any]], rows, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, key, label in ((axes[0], "pgd20", "PGD-20 accuracy (%)"), (axes[1], "clean", "clean accuracy (%)")):
        for r in rows:
            rs = [x for x in runs if x["method"] == r["method"] and x["optimizer"] == r["optimizer"]]
            n = min(len(x["history"]) for x in rs)
            secs = [statistics.median(x["history"][i]["seconds"] for x in rs) for i in range(n)]
            acc = [100 * statistics.median(x["history"][i][key] for x in rs) for i in range(n)]
            ax.plot(secs, acc, marker=".", label=f"{r['setting']} / {r['optimizer']}",
                    linestyle="-" if r["optimizer"] == "sgd" else "--")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "robust_vs_seconds.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pmptrain bench --task robust",
                                description="Adversarial training (standard, PGD-10 AT, Free, Fast, YOPO-m-n, TRADES, "
                                            "TRADES-YOPO) x optimizers (sgd, emsa): clean, PGD-20 and AutoAttack "
                                            "accuracy, wall-clock and passes relative to PGD-10 AT, time to PGD-10 "
                                            "AT's robust accuracy, and the closed-loop controller.")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist (default; falls back to mnist1d with a note when absent), mnist1d, "
                        "mnist, cifar10, svhn (PreAct ResNet-18, eps 8/255)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--optimizers", default="sgd,emsa", help="sgd and/or emsa (default both)")
    p.add_argument("--lr", default=None, metavar="OPT=X,...", help="learning rates (default sgd=0.05, emsa=1)")
    p.add_argument("--epochs", type=int, default=10, help="PGD-AT / Fast / TRADES / standard epochs (default 10)")
    p.add_argument("--yopo-epochs", type=int, default=None, help="YOPO and TRADES-YOPO epochs (default epochs/2)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=float, default=None, help="radius (default 0.1; 8/255 on CIFAR-10/SVHN)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--pgd-k", type=int, default=10, help="PGD-AT and TRADES attack steps (default 10)")
    p.add_argument("--free-m", type=int, default=4, help="Free AT replays (default 4; epochs/m epochs)")
    p.add_argument("--yopo-m", type=int, default=5)
    p.add_argument("--yopo-n", type=int, default=3)
    p.add_argument("--beta", type=float, default=6.0, help="TRADES beta (default 6)")
    p.add_argument("--eval-n", type=int, default=1000, help="test examples evaluated per epoch (default 1000)")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--autoattack", action=argparse.BooleanOptionalAction, default=True,
                   help="AutoAttack of the final models (needs the robust extra; default on)")
    p.add_argument("--closed-loop", action=argparse.BooleanOptionalAction, default=True,
                   help="the closed-loop controller column (default on)")
    p.add_argument("--cl-n", type=int, default=200, help="test examples for the closed-loop columns (default 200)")
    p.add_argument("--cl-fit", type=int, default=2000, help="clean training examples for its PCA (default 2000)")
    p.add_argument("--cl-energy", type=float, default=0.95, help="PCA variance kept (default 0.95)")
    p.add_argument("--cl-adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="PGD-20 through the controller by BPDA (default on)")
    p.add_argument("--tol-robust", type=float, default=1.5)
    p.add_argument("--tol-clean", type=float, default=2.0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=None, help="output directory (default runs/robust-<timestamp>)")
    return p


def _check(ns) -> None:
    for k in ("epochs", "seeds", "batch_size", "pgd_k", "free_m", "yopo_m", "eval_n", "cl_n", "cl_fit"):
        v = getattr(ns, k)
        if v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if ns.yopo_n < 0:
        raise ValueError(f"--yopo-n must be >= 0, got {ns.yopo_n}")
    if ns.yopo_epochs is not None and ns.yopo_epochs < 1:
        raise ValueError(f"--yopo-epochs must be >= 1, got {ns.yopo_epochs}")
    ns.methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    bad = [m for m in ns.methods if m not in METHODS]
    if bad or not ns.methods:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    ns.optimizers = [o.strip() for o in ns.optimizers.split(",") if o.strip()]
    if not ns.optimizers or any(o not in ("sgd", "emsa") for o in ns.optimizers):
        raise ValueError(f"--optimizers: expected sgd and/or emsa, got {ns.optimizers}")
    lr: Dict[str, float] = {}
    if ns.lr:
        for part in ns.lr.split(","):
            k, eq, v = part.partition("=")
            try:
                lr[k.strip()] = float(v)
            except ValueError:
                raise ValueError(f"--lr: expected OPT=X pairs (sgd=0.05,emsa=1), got {ns.lr!r}") from None
    ns.lr = lr
    if ns.eps is not None and not (math.isfinite(ns.eps) and ns.eps > 0):
        raise ValueError(f"--eps must be > 0, got {ns.eps}")


def run(ns, log=print) -> Dict[str, Any]:
    from ..bench.records import atomic_write_json, check_out_dir, versions

    out = Path(ns.out or f"runs/robust-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out_dir(out)  # /proc/x, a link loop, a path through a file: exit 2 before the data are loaded
    out.mkdir(parents=True, exist_ok=True)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    data = load(ns.dataset, ns.data_dir, ns.download, ns.max_train, ns.max_test, log)
    ns.eps = data["eps"] if ns.eps is None else ns.eps
    ns.bounds = data["bounds"]
    writer = None
    if ns.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except Exception as e:  # pragma: no cover - optional
            log(f"note: TensorBoard logs not written ({e})")
    config = {k: v for k, v in vars(ns).items() if k not in ("bounds",)}
    config["bounds"] = ns.bounds
    meta = {"config": config, "dataset": data["name"], "model": data["model"], "note": data["note"],
            "versions": versions(), "attack_library": library.available(), "threads": torch.get_num_threads()}
    runs = []
    # interleave methods within a seed so that machine load affects them alike
    for seed in range(ns.seeds):
        for method in ns.methods:
            for opt in ns.optimizers:
                runs.append(run_one(ns, data, method, opt, seed, writer, log))
                atomic_write_json({"meta": meta, "runs": runs}, out / "runs.json")
    if writer is not None:
        writer.close()
    rows = aggregate(runs, ns)
    results = {"schema": 1, "task": "robust", "meta": meta, "rows": rows, "runs": runs}
    atomic_write_json(results, out / "results.json")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["setting"] + list(ROW_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ["setting"] + list(ROW_FIELDS)})
    table = format_table(rows, meta)
    (out / "results.txt").write_text(table + "\n")
    plot(runs, rows, out)
    log(table)
    log(f"results: {out / 'results.json'}, {out / 'results.csv'}, plot: {out / 'robust_vs_seconds.png'}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """``pmptrain bench --task robust [options]``; returns the exit status (2: bad arguments or data)."""
    from ..bench.data import DataError

    p = build_parser()
    ns = p.parse_args(argv)
    try:
        _check(ns)
        run(ns)
    except (ValueError, DataError) as e:
        print(f"pmptrain bench --task robust: error: {e}", file=sys.stderr)
        return 2
    return 0
