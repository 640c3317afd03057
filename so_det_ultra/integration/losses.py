"""Model-YAML loss selection in Ultralytics: ``loss:`` picks a registered criterion instead of the default.

The ``loss:`` section and how a criterion is built: :mod:`so_det_ultra.losses.config`. The patch: ``init_criterion``
of ``DetectionModel`` and ``RTDETRDetectionModel`` (the two that the detect and RT-DETR trainers build) is wrapped to
consult ``self.yaml["loss"]`` first.
"""

from __future__ import annotations

import functools


def wrap_init_criterion(original):
    @functools.wraps(original)
    def init_criterion(self):
        # loaded on first use: the losses import Ultralytics' model package, which may be mid-import at install time
        from so_det_ultra.losses.config import build_loss, loss_config

        cfg = loss_config(self)
        return build_loss(self, cfg) if cfg else original(self)

    init_criterion.__so_det_ultra__ = True
    return init_criterion


def install(ledger):
    """Wrap ``init_criterion`` of the two model classes the detect and RT-DETR trainers build."""
    from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel

    for cls in (DetectionModel, RTDETRDetectionModel):
        fn = cls.__dict__["init_criterion"]
        if not getattr(fn, "__so_det_ultra__", False):
            ledger.set_class_attr(cls, "init_criterion", wrap_init_criterion(fn))
