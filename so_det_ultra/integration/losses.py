"""Model-YAML loss selection: ``loss:`` picks a registered criterion instead of Ultralytics' default.

A model YAML may carry::

    loss:
      type: DCLoss        # a name registered with so_det_ultra.registry.register_loss
      gamma: 0.5          # every other key is passed to the loss constructor as a keyword argument

Absent ``loss:`` (or ``type: default``), Ultralytics' own criterion is used, unchanged. The loss class is built as
``cls(model, **kwargs)`` like Ultralytics' ``v8DetectionLoss(model)``, and must return what the default criterion
returns for that model (``(loss_sum, loss_items)``).

The patch: ``init_criterion`` of ``DetectionModel`` and ``RTDETRDetectionModel`` (the two that the detect and RT-DETR
trainers build) is wrapped to consult ``self.yaml["loss"]`` first.
"""

from __future__ import annotations

import functools

from so_det_ultra.registry import LOSSES, ModelBuildError


def loss_config(model) -> dict | None:
    cfg = (getattr(model, "yaml", None) or {}).get("loss")
    if not cfg or str(cfg.get("type", "default")).lower() == "default":
        return None
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ModelBuildError(f"model YAML `loss:` must be a mapping with a `type:` key, got {cfg!r}")
    return cfg


def build_loss(model, cfg: dict):
    import so_det_ultra.losses  # noqa: F401  (registers every loss)

    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    try:
        cls = LOSSES.get(cfg["type"]).cls
    except KeyError as err:
        raise ModelBuildError(f"model YAML `loss: type: {cfg['type']}`: {err}") from None
    return cls(model, **kwargs)


def wrap_init_criterion(original):
    @functools.wraps(original)
    def init_criterion(self):
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
