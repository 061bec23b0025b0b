"""A bench: every optimizer × (tuning value) × seed of a :class:`BenchConfig`, run by
:func:`pmptrain.bench.runner.run_one`, the best setting chosen when tuning, the SGD step-time
reference measured, and the results handed to :mod:`pmptrain.bench.report`."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

from . import report
from .config import BenchConfig
from .ranks import broadcast_object, dist_info
from .records import atomic_write_json, check_out_dir, versions
from .registry import check_fsdp, get_spec
from .schema import ConfigError
from .runner import load_data, preflight, run_one, time_steps

__all__ = ["run_bench"]


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def run_bench(cfg: BenchConfig, out_dir: Path, resume: bool = False,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every optimizer × setting × seed of ``cfg`` into ``out_dir`` and write the report.

    Layout of ``out_dir``: ``config.json`` (the config, versions, git hash, world size),
    ``runs/<optimizer>[/<key>=<value>]/seed<k>/{checkpoint.pt,run.json}``,
    ``tensorboard/<optimizer>[/<key>=<value>]/seed<k>/``, ``sgd_reference.json`` (when ``sgd`` is
    not benchmarked), and the report files of :func:`pmptrain.bench.report.write_report`.

    Returns:
        the results dict written to ``results.json``.
    """
    cfg.validate()
    rank, world = dist_info()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    say = log if rank == 0 else (lambda *_: None)
    if world > 1 and cfg.fsdp:
        check_fsdp(cfg.optimizers)
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(f"--batch-size: {cfg.batch_size} is not divisible by the {world} ranks: the PMP optimizers "
                          "refuse unequal per-rank batches under DistributedDataParallel")
    meta = {"config": cfg.to_dict(), "versions": versions(), "world_size": world,
            "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if rank == 0:
        check_out_dir(out_dir)  # /proc/x, a link loop, a read-only place: refused before loading
    data = load_data(cfg)  # before creating anything: missing data leaves no empty bench dir
    settings = {name: list(cfg.settings(name)) for name in cfg.optimizers}
    preflight(cfg, data, settings)  # so does a value only the model or an optimizer can refuse
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and (out_dir / "config.json").is_file()):
            atomic_write_json(meta, out_dir / "config.json")
    say(f"data: {data!r}")

    runs: List[Dict[str, Any]] = []
    chosen: Dict[str, Dict[str, Any]] = {}
    # every (optimizer, setting) × seed, interleaved seed-major (seed 0 of every optimizer, then
    # seed 1, …) so that a change of machine load does not fall on one optimizer's timings
    recs_of: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for seed in cfg.seeds:
        for name in cfg.optimizers:
            spec = get_spec(name)
            for i, overrides in enumerate(settings[name]):
                sub = Path("runs") / spec.name
                tb = Path("tensorboard") / spec.name
                if cfg.tune:
                    tag = f"{spec.lr_key}={_fmt_value(overrides[spec.lr_key])}"
                    sub, tb = sub / tag, tb / tag
                rec = run_one(cfg, data, spec.name, overrides, seed, out_dir / sub / f"seed{seed}",
                              (out_dir / tb / f"seed{seed}") if cfg.tensorboard else None,
                              resume=resume)
                s = rec["summary"]
                say(f"{spec.name:>15} {dict(overrides)} seed {seed}: test acc "
                    f"{s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f}), "
                    f"median step {1e3 * s['median_step_time']:.2f} ms")
                recs_of.setdefault((name, i), []).append(rec)
    for name in cfg.optimizers:
        spec = get_spec(name)
        per_setting = [(o, recs_of[(name, i)]) for i, o in enumerate(settings[name])]
        if cfg.tune:
            key = "final_val_acc" if data.val_x is not None else "final_test_acc"
            best = max(per_setting, key=lambda pr: _median([r["summary"][key] for r in pr[1]]) or -1)
            chosen[spec.name] = {"tuned": True, "selected_by": f"median {key} over seeds",
                                 "grid": list(spec.tune_grid), "lr_key": spec.lr_key,
                                 "value": best[0][spec.lr_key],
                                 "grid_scores": {_fmt_value(o[spec.lr_key]):
                                                 _median([r["summary"][key] for r in rs])
                                                 for o, rs in per_setting}}
            best_recs = best[1]
        else:
            best_recs = per_setting[0][1]
            chosen[spec.name] = {"tuned": False, "lr_key": spec.lr_key,
                                 "value": dict(spec.defaults, **per_setting[0][0])[spec.lr_key]}
        for overrides, recs in per_setting:
            for r in recs:
                r["selected"] = any(r is b for b in best_recs)
                runs.append(r)

    # SGD reference step time, measured in this bench
    sgd_runs = [r for r in runs if r["optimizer"] == "sgd" and r["selected"]]
    if sgd_runs:
        sgd_time = _median([r["summary"]["median_step_time"] for r in sgd_runs])
        sgd_source = "sgd runs of this bench (median over seeds)"
    else:
        ref_path = out_dir / "sgd_reference.json"
        ref = None
        if resume and ref_path.is_file():
            ref = json.loads(ref_path.read_text())
        ref = broadcast_object(ref)
        if ref is None:
            times = time_steps(cfg, data, "sgd", cfg.seeds[0], steps=30, desc="sgd timing reference")
            ref = {"median_step_time": statistics.median(times), "steps": len(times)}
            if rank == 0:
                atomic_write_json(ref, ref_path)
        sgd_time = ref["median_step_time"]
        sgd_source = f"{ref['steps']}-step SGD reference on the same model, data and seed"

    results = report.aggregate(runs, chosen, cfg, meta, sgd_time, sgd_source)
    if rank == 0:
        report.write_report(results, out_dir, log=say)
    return results
