"""Callbacks added to Ultralytics' default callback table (public mechanism used by its own integrations).

Ultralytics copies ``ultralytics.utils.callbacks.base.default_callbacks`` into every trainer, validator and predictor,
so a function appended here runs in ``yolo train``/``yolo val`` without the user passing anything.
"""

from __future__ import annotations

CALLBACKS = {}  # event name -> list of "module:function" paths, imported lazily when the event fires


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
