"""Model-YAML loss selection: the ``loss:`` section names a registered criterion and its keyword arguments.

A model YAML may carry::

    loss:
      type: DCLoss        # a name registered with so_det_ultra.registry.register_loss
      gamma: 0.5          # every other key is passed to the loss constructor as a keyword argument

Absent ``loss:`` (or ``type: default``), Ultralytics' own criterion is used, unchanged. The loss class is built as
``cls(model, **kwargs)`` like Ultralytics' ``v8DetectionLoss(model)``, and must return what the default criterion
returns for that model (``(loss_sum, loss_items)``). The integration's ``init_criterion`` patch calls these.
"""

from __future__ import annotations

from so_det_ultra.registry import LOSSES, ModelBuildError


def loss_config(model) -> dict | None:
    """The model YAML's ``loss:`` mapping, or None for Ultralytics' default criterion; ModelBuildError if malformed."""
    cfg = (getattr(model, "yaml", None) or {}).get("loss")
    if not cfg or (isinstance(cfg, dict) and str(cfg.get("type", "default")).lower() == "default"):
        return None
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ModelBuildError(f"model YAML `loss:` must be a mapping with a `type:` key, got {cfg!r}")
    return cfg


def build_loss(model, cfg: dict):
    """``cls(model, **kwargs)`` for the registered loss ``cfg["type"]`` and the other keys of ``cfg``."""
    import so_det_ultra.losses  # noqa: F401  (registers every loss)

    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    try:
        cls = LOSSES.get(cfg["type"]).cls
    except KeyError as err:
        raise ModelBuildError(f"model YAML `loss: type: {cfg['type']}`: {err}") from None
    return cls(model, **kwargs)
