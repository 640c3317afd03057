"""The only package that touches Ultralytics internals; every change it makes is recorded in :data:`PATCHES`.

Owns: the registration of so-det-ultra with Ultralytics (and torch's safe-loading allow-list), and its undoing. It
sits on top of the layers (docs/architecture.md) and plugs in what the packages below provide: the parser learns the
blocks of :data:`so_det_ultra.registry.BLOCKS` (:mod:`.parser`, :mod:`.names`, :mod:`.rtdetr`), the model YAML's
``loss:`` picks a criterion (:mod:`.losses`), ESOD patch training gets its seam (:mod:`.esod`), the metrics their
callbacks (:mod:`.callbacks`), checkpoints a version stamp (:mod:`.checkpoint`) and torch the allow-list
(:mod:`.serialization`).

``install()`` runs once per process, right after ``ultralytics.nn.tasks`` has been imported (see
``so_det_ultra._bootstrap``), and makes each change through a :class:`~.ledger.Ledger`, which records the original
object and what undoes it; ``uninstall()`` reverts them all, newest first, after which ``install()`` may run again.
The table of changes: docs/architecture.md, "The host patches".
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
            PATCHES.undo()
            raise
        _state["done"] = True


def uninstall():
    """Revert every change :func:`install` made (each attribute holds its original object again); idempotent."""
    with _lock:
        if _state["done"]:
            PATCHES.undo()
            _state["done"] = False


def installed() -> bool:
    return _state["done"]
