"""so-det-ultra: small-object detection research blocks for Ultralytics YOLO.

Importing this package is cheap (standard library only): it arranges for the plugin to register itself with
Ultralytics the moment ``ultralytics.nn.tasks`` is imported, or at once if it already is. An installed copy does
this in every Python process through ``so_det_ultra_autoload.pth``; set ``SO_DET_ULTRA_AUTOLOAD=0`` to switch that
off, after which ``import so_det_ultra`` (before or after Ultralytics) turns it back on for that process.

Every change the plugin makes to Ultralytics is recorded in ``so_det_ultra.integration.PATCHES``;
:func:`uninstall` reverts them all and :func:`register` applies them again.

Examples:
    >>> import so_det_ultra  # noqa: F401  (optional when installed: auto-loaded)
    >>> from ultralytics import YOLO
    >>> model = YOLO("so-det-s.yaml")  # SO-Det, scale s, from the shipped cfg/models/so-det.yaml
"""

from so_det_ultra._bootstrap import ensure_registered
from so_det_ultra._version import __version__

__all__ = ("__version__", "register", "uninstall")

ensure_registered()


def register():
    """Register the plugin with Ultralytics now, importing Ultralytics if needed; raises on any failure."""
    import ultralytics.nn.tasks  # noqa: F401  (the import itself runs the registration hook)

    from so_det_ultra.integration import install

    install(strict=True)


def uninstall():
    """Undo every change the registration made to Ultralytics (and torch's allow-list); :func:`register` redoes it.

    Afterwards each patched function, method, global, callback list and the safe-globals set is exactly what it was
    before; models, trainers and validators created in between keep what they copied (criterion, callbacks).
    """
    from so_det_ultra.integration import uninstall as _uninstall

    _uninstall()
