"""Results of ``pmptrain bench``: a table (text, JSON, CSV) and plots (PNG).

Files written by :func:`write_report` into the bench directory:

* ``results.json`` — ``{"schema": 1, "meta", "clock", "target_acc", "sgd_reference", "rows", "runs",
  "time_to_final_acc"}``: ``clock`` is the training clock of every time in the file (``"wall"`` or
  ``"cpu"``, :mod:`pmptrain.bench.clock`), ``rows`` has one entry per optimizer (its selected setting; fields
  :data:`ROW_FIELDS`), ``runs`` one per (optimizer, setting, seed) with its summary and per-epoch
  curves, ``time_to_final_acc`` the seconds every optimizer takes to reach every optimizer's final
  accuracy (:func:`time_to_final_acc`; also a second table in ``results.txt``).
* ``results.csv`` — ``rows`` as CSV with the columns :data:`ROW_FIELDS`.
* ``results.txt`` — the text table printed at the end of the bench.
* ``acc_vs_epoch.png``, ``acc_vs_seconds.png`` — test accuracy against epoch and against
  cumulative training seconds, one line per optimizer (median over seeds) with the min–max seed
  spread as a band (matplotlib, Agg backend).

Statistics over seeds: the median, with the spread given as ``[min, max]``. Epochs/seconds to
target are medians over the seeds that reached the target (``reached`` counts them). With
``--tune lr`` each optimizer's row is the best grid value (``setting`` names it, ``tuned`` is
true, ``selected_by`` says how it was chosen) — the numbers are "best of the grid".
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .clock import CLOCK_SOURCES, clock_label

__all__ = ["ROW_FIELDS", "aggregate", "format_table", "format_time_to_final_acc", "time_to_final_acc",
           "write_report", "plot"]

#: Columns of ``results.csv`` / keys of each ``results.json`` row.
ROW_FIELDS = (
    "optimizer", "setting", "tuned", "selected_by", "seeds",
    "final_acc_median", "final_acc_min", "final_acc_max",
    "best_acc_median", "best_acc_min", "best_acc_max",
    "target_acc", "reached", "epochs_to_target_median", "seconds_to_target_median",
    "median_step_ms", "ratio_to_sgd", "peak_rss_mb", "rss_increase_mb", "optimizer_state_mb",
    "final_density", "density_convention", "skipped_steps",
)


def _clean(xs):
    return [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]


def _med(xs) -> Optional[float]:
    xs = _clean(xs)
    return statistics.median(xs) if xs else None


def _curves(rec: Dict[str, Any]) -> Dict[str, List[float]]:
    h = rec["history"]
    out = {"epoch": [e["epoch"] + 1 for e in h], "test_acc": [e["test_acc"] for e in h],
           "test_loss": [e["test_loss"] for e in h], "train_loss": [e["train_loss"] for e in h],
           "seconds": [e["seconds"] for e in h]}
    probes = [p for e in h for p in e.get("probes", ())]
    if probes:  # --eval-every: test accuracy between the epochs' ends
        out.update({"probe_step": [p["step"] for p in probes], "probe_seconds": [p["seconds"] for p in probes],
                    "probe_acc": [p["test_acc"] for p in probes]})
    return out


def _points(c: Dict[str, List[float]]) -> List[tuple]:
    """``(seconds, test_acc)`` of a run's curves in time order: every epoch's end and, with
    ``--eval-every``, the evaluations between them."""
    pts = list(zip(c["seconds"], c["test_acc"])) + list(zip(c.get("probe_seconds", ()), c.get("probe_acc", ())))
    return sorted(pts, key=lambda p: p[0])


def aggregate(runs: List[Dict[str, Any]], chosen: Dict[str, Dict[str, Any]], cfg, meta: Dict[str, Any],
              sgd_time: Optional[float], sgd_source: str) -> Dict[str, Any]:
    """Build the results dict from the run records of :func:`pmptrain.bench.runner.run_one`."""
    rows = []
    for name, ch in chosen.items():
        sel = [r for r in runs if r["optimizer"] == name and r.get("selected")]
        s = [r["summary"] for r in sel]
        fin = _clean([x["final_test_acc"] for x in s])
        best = _clean([x["best_test_acc"] for x in s])
        reached = [x for x in s if x["epochs_to_target"] is not None]
        step = _med([x["median_step_time"] for x in s])
        dens = _clean([r["history"][-1].get("density") for r in sel if r["history"]])
        rows.append({
            "optimizer": name,
            "setting": f"{ch['lr_key']}={ch['value']:g}",
            "tuned": bool(ch["tuned"]),
            "selected_by": ch.get("selected_by", "registry default" if not ch["tuned"] else ""),
            "seeds": len(sel),
            "final_acc_median": _med(fin), "final_acc_min": min(fin) if fin else None,
            "final_acc_max": max(fin) if fin else None,
            "best_acc_median": _med(best), "best_acc_min": min(best) if best else None,
            "best_acc_max": max(best) if best else None,
            "target_acc": cfg.target_acc,
            "reached": len(reached),
            "epochs_to_target_median": _med([x["epochs_to_target"] for x in reached]),
            "seconds_to_target_median": _med([x["seconds_to_target"] for x in reached]),
            "median_step_ms": None if step is None else 1e3 * step,
            "ratio_to_sgd": (step / sgd_time) if (step and sgd_time) else None,
            "peak_rss_mb": _med([x.get("peak_rss_mb") for x in s]),
            "rss_increase_mb": _med([x.get("rss_increase_mb") for x in s]),
            "optimizer_state_mb": _med([x.get("optimizer_state_mb") for x in s]),
            "final_density": _med(dens),
            "density_convention": getattr(cfg, "density_convention", "discrete"),
            "skipped_steps": sum(x.get("skipped_steps", 0) for x in s),
        })
        if ch["tuned"]:
            rows[-1]["grid_scores"] = ch.get("grid_scores")
    run_list = [{"optimizer": r["optimizer"], "hparams": r["hparams"], "seed": r["seed"],
                 "selected": bool(r.get("selected")), "summary": r["summary"], "curves": _curves(r)}
                for r in runs]
    return {"schema": 1, "meta": meta, "clock": getattr(cfg, "clock", "wall"), "target_acc": cfg.target_acc,
            "sgd_reference": {"median_step_ms": None if sgd_time is None else 1e3 * sgd_time,
                              "source": sgd_source},
            "rows": rows, "runs": run_list, "time_to_final_acc": time_to_final_acc(rows, run_list)}


def time_to_final_acc(rows: List[Dict[str, Any]], run_list: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Time to every optimizer's final accuracy, for every optimizer ("per second", issue 17).

    For each optimizer B of ``rows`` (the *baseline*) the target is B's median final test
    accuracy; for each optimizer O, ``seconds[O]`` is the median over O's selected seeds that reach
    it of the cumulative training seconds (evaluation excluded) at the first epoch whose test
    accuracy is ≥ the target — None if no seed did — and ``reached[O]`` counts those seeds out of
    O's. Granularity: the evaluations of the run — each epoch's end and, with ``--eval-every K``,
    every K-th step (the curves' ``probe_*``); an optimizer that reaches the target between two
    evaluations is charged up to the later one. The seconds are on the bench's clock (results'
    ``clock``). ``{B: {"target_acc", "seconds": {O: s}, "reached": {O: [k, n]}}}``.
    """
    curves: Dict[str, List[Dict[str, List[float]]]] = {}
    for r in run_list:
        if r.get("selected"):
            curves.setdefault(r["optimizer"], []).append(r["curves"])
    out: Dict[str, Any] = {}
    for base in rows:
        target = base.get("final_acc_median")
        if target is None:
            continue
        seconds, reached = {}, {}
        for name, cs in curves.items():
            hits = []
            for c in cs:
                hit = next((sec for sec, acc in _points(c) if acc is not None and acc >= target), None)
                if hit is not None:
                    hits.append(hit)
            seconds[name] = _med(hits)
            reached[name] = [len(hits), len(cs)]
        out[base["optimizer"]] = {"target_acc": target, "seconds": seconds, "reached": reached}
    return out


def format_time_to_final_acc(ttf: Dict[str, Any], clock: str = "wall") -> str:
    """:func:`time_to_final_acc` as a text table: one row per optimizer, one column per baseline's
    final accuracy (seconds on ``clock``, medians over the seeds that reached it; ``k/n`` when not
    all did)."""
    if not ttf:
        return ""
    bases = list(ttf)
    names = list(next(iter(ttf.values()))["seconds"])
    head = [f"{clock_label(clock)} seconds to the final acc of →"] + [f"{b} ({_pct(ttf[b]['target_acc'])}%)" for b in bases]
    lines = []
    for n in names:
        cells = [n]
        for b in bases:
            s, (k, tot) = ttf[b]["seconds"].get(n), ttf[b]["reached"].get(n, [0, 0])
            cell = "not reached" if s is None else f"{s:.1f}"
            if s is not None and k < tot:
                cell += f" ({k}/{tot})"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in lines])


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v, fmt) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(results: Dict[str, Any]) -> str:
    """The results as an aligned text table (accuracies in %); the time columns name the clock
    (``(cpu)`` for process CPU time)."""
    clock = results.get("clock", "wall")
    tag = "" if clock == "wall" else f" ({clock})"
    head = ["optimizer", "setting", "final acc % [min-max]", "best acc %", "ep→tgt", f"s→tgt{tag}",
            f"step ms{tag}", "×SGD", "peak MB", "state MB"]
    lines = []
    for r in results["rows"]:
        setting = r["setting"] + (" (best of grid)" if r["tuned"] else "")
        fin = (f"{_pct(r['final_acc_median'])} [{_pct(r['final_acc_min'])}-{_pct(r['final_acc_max'])}]"
               if r["seeds"] > 1 else _pct(r["final_acc_median"]))
        ep = _num(r["epochs_to_target_median"], "g")
        if r["reached"] < r["seeds"]:
            ep += f" ({r['reached']}/{r['seeds']})"
        lines.append([r["optimizer"], setting, fin, _pct(r["best_acc_median"]), ep,
                      _num(r["seconds_to_target_median"], ".1f"), _num(r["median_step_ms"], ".2f"),
                      _num(r["ratio_to_sgd"], ".2f"), _num(r["peak_rss_mb"], ".0f"),
                      _num(r["optimizer_state_mb"], ".2f")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row) for row in lines]
    cfgd = results["meta"]["config"]
    ttf = format_time_to_final_acc(results.get("time_to_final_acc") or {}, clock)
    if ttf:
        out += ["", ttf]
    out.append("")
    out.append(f"{cfgd['dataset']} / {cfgd['model']}, {cfgd['epochs']} epochs, batch "
               f"{cfgd['batch_size']}, seeds {cfgd['seeds']}; target {100 * results['target_acc']:g}% "
               f"test accuracy; medians over seeds; times: {clock_label(clock)} "
               f"({CLOCK_SOURCES[clock]}); ×SGD relative to "
               f"{_num(results['sgd_reference']['median_step_ms'], '.2f')} ms "
               f"({results['sgd_reference']['source']}).")
    return "\n".join(out)


def plot(results: Dict[str, Any], out_dir: Path) -> List[Path]:
    """Write ``acc_vs_epoch.png`` and ``acc_vs_seconds.png``; return their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    seconds_label = f"training time (s, {clock_label(results.get('clock', 'wall'))})"
    for xkey, fname, xlabel in (("epoch", "acc_vs_epoch.png", "epoch"),
                                ("seconds", "acc_vs_seconds.png", seconds_label)):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for row in results["rows"]:
            runs = [r for r in results["runs"] if r["optimizer"] == row["optimizer"] and r["selected"]]
            n = min((len(r["curves"]["test_acc"]) for r in runs), default=0)
            if n == 0:
                continue
            acc = np.array([r["curves"]["test_acc"][:n] for r in runs]) * 100
            xs = np.array([r["curves"][xkey][:n] for r in runs], dtype=float)
            x = np.median(xs, axis=0)
            label = f"{row['optimizer']} ({row['setting']})"
            (line,) = ax.plot(x, np.median(acc, axis=0), marker="." if n < 30 else None, label=label)
            if len(runs) > 1:
                ax.fill_between(x, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.2,
                                linewidth=0)
        if xkey == "epoch":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(100 * results["target_acc"], color="grey", linestyle=":", linewidth=1)
        cfgd = results["meta"]["config"]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{cfgd['dataset']} / {cfgd['model']}: median over {len(cfgd['seeds'])} "
                     f"seed(s), band = min–max", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: Dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Write ``results.json``, ``results.csv``, ``results.txt`` and the plots; print the table."""
    from .records import atomic_write_json

    out_dir = Path(out_dir)
    atomic_write_json(results, out_dir / "results.json")
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in results["rows"]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ROW_FIELDS})
    table = format_table(results)
    (out_dir / "results.txt").write_text(table + "\n")
    plot(results, out_dir)
    log(table)
    log(f"results: {out_dir / 'results.json'}, {out_dir / 'results.csv'}, plots: "
        f"{out_dir / 'acc_vs_epoch.png'}, {out_dir / 'acc_vs_seconds.png'}")
