"""``YOLO("so-det-rtdetr-l.yaml")`` fails with a message that says to use ``RTDETR`` (patch of ``guess_model_task``).

Ultralytics' ``YOLO`` cannot build RT-DETR YAMLs: ``guess_model_task`` finds no task for a head named
``...RTDETRDecoder`` and ``YOLO`` stops with "'YOLO' model does not support '_new' mode for 'None' task." (stock
``YOLO("rtdetr-l.yaml")`` does the same; passing ``task="detect"`` would build a ``DetectionModel`` with the wrong
loss). For YAMLs whose head is one of *our* RT-DETR decoders the wrapper raises a clear error instead; everything else,
including Ultralytics' own RT-DETR YAMLs, goes to the original unchanged. ``RTDETR(...)`` and ``yolo ... model=
*rtdetr*.yaml`` pass ``task="detect"`` and never call it for YAMLs.
"""

from __future__ import annotations

import functools


def _our_rtdetr_head(cfg) -> str | None:
    try:
        name = cfg["head"][-1][-2]
    except (KeyError, IndexError, TypeError):
        return None
    from ultralytics.nn.modules import RTDETRDecoder

    from so_det_ultra.registry import BLOCKS

    if not isinstance(name, str) or name not in BLOCKS:
        return None
    return name if issubclass(BLOCKS.get(name).cls, RTDETRDecoder) else None


def wrap_guess_model_task(guess):
    @functools.wraps(guess)
    def guess_model_task(model):
        head = _our_rtdetr_head(model) if isinstance(model, dict) else None
        if head is not None:
            file = model.get("yaml_file", "the model YAML")
            raise TypeError(
                f"{file} is an RT-DETR model (head {head}); build it with `from ultralytics import RTDETR; "
                f"RTDETR('{file}')` (the CLI routes names containing 'rtdetr' to RT-DETR automatically)"
            )
        return guess(model)

    return guess_model_task


def install(ledger):
    import ultralytics.nn.tasks as tasks

    ledger.rebind(tasks, "guess_model_task", wrap_guess_model_task(tasks.guess_model_task))
