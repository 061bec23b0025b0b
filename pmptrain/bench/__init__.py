"""``pmptrain.bench``: data sets, model builders, runner and CLI of ``pmptrain bench``.

Sub-modules (import them directly; this package re-exports only their entry points):

* :mod:`pmptrain.bench.data`   — ``load_dataset``, ``make_loader``, file readers, download rules;
* :mod:`pmptrain.bench.models` — ``build_model`` and the individual builders.
"""
