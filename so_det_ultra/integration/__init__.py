"""The only package that touches Ultralytics internals; every change it makes is recorded in :data:`PATCHES`.

Owns: the registration of so-det-ultra with Ultralytics (and torch's safe-loading allow-list), and its undoing. May
import anything: Ultralytics internals, torch, :mod:`so_det_ultra.registry`, and the packages whose objects it plugs in
(:mod:`so_det_ultra.nn` for blocks, :mod:`so_det_ultra.losses`, :mod:`so_det_ultra.metrics.hooks` for callbacks).
Nothing else in so-det-ultra patches Ultralytics.

``install()`` runs once per process, right after ``ultralytics.nn.tasks`` has been imported (see ``_bootstrap``), and
records each change in :data:`PATCHES` (a :class:`~.ledger.Ledger`: ``target -> Change`` with the original object
and what undoes it). The changes, by module:

- :mod:`.parser`: ``ultralytics.nn.tasks.parse_model`` recompiled with the block lookup and channel-rule branch; the
  one global it calls, ``ultralytics.nn.tasks._so_det_ultra_parse``, added.
- :mod:`.names`: ``ultralytics.utils.checks.check_file`` (bare names of our shipped YAMLs, ``so-det-s.yaml``,
  ``visdrone.yaml``, resolve to ``cfg/`` when no local file of that name exists) and
  ``ultralytics.nn.tasks.guess_model_scale`` (``<family>-<scale>.yaml`` names give their scale letter).
- :mod:`.losses`: ``DetectionModel.init_criterion`` and ``RTDETRDetectionModel.init_criterion``: a model YAML's
  ``loss:`` section picks a registered criterion; without it, Ultralytics' own.
- :mod:`.rtdetr`: ``ultralytics.nn.tasks.guess_model_task``: ``YOLO()`` on a YAML whose head is one of our RT-DETR
  decoders says to use ``RTDETR``.
- :mod:`.esod`: ``DetectionModel.loss`` (patch training for a model YAML with ``esod_train:``) and two callbacks
  (ESODLoss's class ratios from the training labels, the epoch for patch training's warm-up).
- :mod:`.callbacks`: functions appended to ``ultralytics.utils.callbacks.base.default_callbacks`` (one entry each).
- :mod:`.checkpoint`: ``ultralytics.nn.tasks.torch_safe_load`` (a checkpoint naming a so-det-ultra block this version
  lacks fails with a message naming the block and both versions) and one ``on_pretrain_routine_end`` callback (the
  trained model's YAML dict records this version, ``model.yaml["so_det_ultra"]``).
- :mod:`.serialization`: every registered class added to torch's weights-only allow-list
  (``torch.serialization.add_safe_globals``), so ``ULTRALYTICS_SAFE_LOAD=1`` loads our checkpoints (one entry each).

Functions Ultralytics imports by value (``from ultralytics.nn.tasks import yaml_model_load``) are replaced in every
already-imported ``ultralytics.*`` module that holds the original object, so the order of imports does not matter.
``uninstall()`` reverts every recorded change (newest first), after which ``install()`` may run again. Trainers,
validators and models created while installed keep what they copied (their callbacks, their criterion).
"""

from __future__ import annotations

import os
import threading
import warnings

from so_det_ultra.integration import version
from so_det_ultra.integration.ledger import Change, Ledger

PATCHES = Ledger()  # every change install() made: target -> Change (see module docstring)
_lock = threading.RLock()
_state = {"done": False}

__all__ = ("PATCHES", "Change", "Ledger", "install", "installed", "uninstall")


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
        from so_det_ultra.integration import callbacks, checkpoint, esod, losses, names, parser, rtdetr, serialization

        try:
            for part in (parser, names, losses, callbacks, serialization, rtdetr, esod, checkpoint):
                part.install(PATCHES)
        except BaseException:
            _undo()
            raise
        _state["done"] = True


def uninstall():
    """Revert every change :func:`install` made (each attribute holds its original object again); idempotent."""
    with _lock:
        if _state["done"]:
            _undo()
            _state["done"] = False


def _undo():
    from so_det_ultra.integration import serialization

    serialization.uninstall()
    PATCHES.undo()


def installed() -> bool:
    return _state["done"]
