"""The only package that touches Ultralytics internals. Everything it changes is listed in :data:`PATCHES`.

``install()`` runs once per process, right after ``ultralytics.nn.tasks`` has been imported (see ``_bootstrap``):

- ``parse_model``: recompiled with the block lookup and channel-rule branch (:mod:`.parser`).
- ``check_file``: bare names of our shipped YAMLs (``so-det-s.yaml``, ``visdrone.yaml``) resolve to ``cfg/`` when no
  local file of that name exists (:mod:`.names`).
- ``guess_model_scale``: ``<family>-<scale>.yaml`` names of our model families give their scale letter.
- ``DetectionModel.init_criterion``/``RTDETRDetectionModel.init_criterion``: a model YAML's ``loss:`` section picks a
  registered criterion (:mod:`.losses`); without it, Ultralytics' own.
- ``guess_model_task``: ``YOLO()`` on a YAML whose head is one of our RT-DETR decoders says to use ``RTDETR``
  (:mod:`.rtdetr`).
- ``default_callbacks``: functions appended to Ultralytics' default callback table (:mod:`.callbacks`).
- ``torch.serialization.add_safe_globals``: every registered class, so ``ULTRALYTICS_SAFE_LOAD=1`` loads our
  checkpoints (a public torch API; listed for completeness).

Functions Ultralytics imports by value (``from ultralytics.nn.tasks import yaml_model_load``) are replaced in every
already-imported ``ultralytics.*`` module that holds the original object, so the order of imports does not matter.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

from so_det_ultra.integration import version

PATCHES = {}  # "module.function" -> original object, filled by install()
_lock = threading.RLock()
_state = {"done": False}


def replace_everywhere(module, name, new):
    """Set ``module.name = new`` and rebind every ``ultralytics.*`` module attribute that holds the original."""
    original = getattr(module, name)
    PATCHES[f"{module.__name__}.{name}"] = original
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("ultralytics") and getattr(mod, name, None) is original:
            setattr(mod, name, new)
    setattr(module, name, new)


def install(strict: bool = False):
    """Register so-det-ultra with the imported Ultralytics (idempotent).

    Args:
        strict: Raise on an unsupported Ultralytics version instead of warning and leaving Ultralytics untouched.
    """
    with _lock:
        if _state["done"]:
            return
        import ultralytics

        if not version.supported(ultralytics.__version__) and not os.environ.get("SO_DET_ULTRA_ALLOW_UNTESTED"):
            if strict:
                raise RuntimeError(version.message(ultralytics.__version__))
            warnings.warn(version.message(ultralytics.__version__), RuntimeWarning, stacklevel=3)
            return
        from so_det_ultra.integration import callbacks, losses, names, parser, rtdetr, serialization

        import ultralytics.nn.tasks as tasks
        import ultralytics.utils.checks as checks

        setattr(tasks, parser.HOOK_NAME, parser.ParseHooks)
        patched = parser.build_parse_model(tasks.parse_model, tasks)
        replace_everywhere(tasks, "parse_model", parser.wrap_parse_model(patched))
        replace_everywhere(checks, "check_file", names.wrap_check_file(checks.check_file))
        replace_everywhere(tasks, "guess_model_scale", names.wrap_guess_model_scale(tasks.guess_model_scale))
        losses.install()
        callbacks.install()
        serialization.install()
        rtdetr.install()
        _state["done"] = True


def installed() -> bool:
    return _state["done"]
