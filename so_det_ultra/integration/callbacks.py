"""Callbacks added to Ultralytics' default callback table (public mechanism used by its own integrations).

Ultralytics copies ``ultralytics.utils.callbacks.base.default_callbacks`` into every trainer, validator and predictor,
so a function appended here runs in ``yolo train``/``yolo val`` without the user passing anything.
"""

from __future__ import annotations

CALLBACKS = {  # event name -> list of "module:function" paths, imported lazily when the event fires
    # issue 5: size-wise APs when the data YAML has a so_det: key (so_det_ultra/metrics/hooks.py)
    "on_val_start": ["so_det_ultra.metrics.hooks:on_val_start"],
    "on_val_end": ["so_det_ultra.metrics.hooks:on_val_end"],
    "on_train_epoch_end": ["so_det_ultra.metrics.hooks:on_train_epoch_end"],
    "on_fit_epoch_end": ["so_det_ultra.metrics.hooks:on_fit_epoch_end"],
}


def _lazy(path):
    module, _, attr = path.partition(":")

    def run(obj):
        import importlib

        return getattr(importlib.import_module(module), attr)(obj)

    run.__qualname__ = run.__name__ = f"so_det_ultra:{attr}"
    return run


def install():
    from ultralytics.utils.callbacks import base

    for event, paths in CALLBACKS.items():
        for path in paths:
            base.default_callbacks[event].append(_lazy(path))
