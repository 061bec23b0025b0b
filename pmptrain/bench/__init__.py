"""``pmptrain.bench``: data sets, model builders, runner and CLI of ``pmptrain bench``.

Sub-modules (import them directly; this package re-exports nothing):

* :mod:`pmptrain.bench.data`       — ``load_dataset``, ``make_loader``, file readers, download rules
  (a package: ``catalog``, ``sources``, ``readers``, ``mnist1d``, ``loader``, ``errors``);
* :mod:`pmptrain.bench.models`     — ``build_model`` and the individual builders;
* :mod:`pmptrain.bench.registry`   — the optimizer registry (``get_spec``, ``build_optimizer``);
* :mod:`pmptrain.bench.config`     — ``BenchConfig``, the validated bench configuration;
* :mod:`pmptrain.bench.losses`     — per-sample losses by name;
* :mod:`pmptrain.bench.runner`     — one run (train, evaluate, checkpoint, resume);
* :mod:`pmptrain.bench.sweep`      — the bench: every optimizer × setting × seed, SGD timing reference;
* :mod:`pmptrain.bench.report`     — results table, CSV, plots;
* :mod:`pmptrain.bench.checkpoint` — checksummed checkpoints; :mod:`pmptrain.bench.records` — JSON
  files and provenance; :mod:`pmptrain.bench.memory`, :mod:`pmptrain.bench.seeding`,
  :mod:`pmptrain.bench.ranks` — measurements, RNG state, ranks;
* :mod:`pmptrain.bench.lm`         — the language-model bench; :mod:`pmptrain.bench.cli` — the CLI.
"""
