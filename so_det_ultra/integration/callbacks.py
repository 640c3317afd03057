"""Callbacks added to Ultralytics' default callback table (public mechanism used by its own integrations).

Ultralytics copies ``ultralytics.utils.callbacks.base.default_callbacks`` into every trainer, validator and predictor,
so a function appended here runs in ``yolo train``/``yolo val`` without the user passing anything. This module is
imported by ``install()`` only, after Ultralytics itself, so importing the hooks here costs nothing at start-up.
"""

from __future__ import annotations

from so_det_ultra.metrics import hooks

CALLBACKS = {  # event name -> functions appended to Ultralytics' default callbacks for that event
    # size-wise APs when the data YAML has a so_det: key (so_det_ultra/metrics/hooks.py, docs/metrics.md)
    "on_val_start": (hooks.on_val_start,),
    "on_val_end": (hooks.on_val_end,),
    "on_train_epoch_end": (hooks.on_train_epoch_end,),
    "on_fit_epoch_end": (hooks.on_fit_epoch_end,),
}


def install(ledger):
    from ultralytics.utils.callbacks import base

    for event, fns in CALLBACKS.items():
        for fn in fns:
            ledger.append(base.default_callbacks[event], fn, f"{base.__name__}.default_callbacks[{event}]")
