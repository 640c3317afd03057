"""Name resolution for our shipped YAMLs (wrappers around Ultralytics' ``check_file`` and ``guess_model_scale``)."""

from __future__ import annotations

import functools
import inspect
import os

from so_det_ultra import paths


def wrap_check_file(check_file):
    """A local file of the name wins; then our ``cfg/``; then Ultralytics' own search (and its error)."""
    sig = inspect.signature(check_file)

    @functools.wraps(check_file)
    def wrapper(*args, **kwargs):
        file = sig.bind(*args, **kwargs).arguments.get("file")
        ours = paths.model_cfg(file) or paths.dataset_cfg(file) if file is not None else None
        if ours is not None and not os.path.exists(str(file)):
            return str(ours)
        return check_file(*args, **kwargs)

    return wrapper


def wrap_guess_model_scale(guess):
    """Ultralytics' guess (``yolo...`` names), else the scale of ``<our family>-<scale>.yaml``."""

    @functools.wraps(guess)
    def wrapper(model_path):
        return guess(model_path) or paths.family_scale(model_path)

    return wrapper


def install(ledger):
    """Rebind ``check_file`` and ``guess_model_scale`` to the wrappers above."""
    import ultralytics.nn.tasks as tasks
    import ultralytics.utils.checks as checks

    ledger.rebind(checks, "check_file", wrap_check_file(checks.check_file))
    ledger.rebind(tasks, "guess_model_scale", wrap_guess_model_scale(tasks.guess_model_scale))
