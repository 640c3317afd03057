"""ESOD training seams: patch training through ``DetectionModel.loss``, and two trainer callbacks.

- ``DetectionModel.loss`` (class attribute; inherited from ``BaseModel`` before): a model whose YAML has an
  ``esod_train:`` key computes its training predictions on uniform patches
  (:func:`so_det_ultra.highres.train.patch_preds`) instead of ``self.forward(batch["img"])``; everything else (eval
  mode, given ``preds``, models without the key) goes to the original unchanged.
- callbacks ``on_train_start`` (ESODLoss's ``cls_ratio`` from the training labels) and ``on_train_epoch_start`` (the
  epoch, read by patch training's warm-up), both no-ops for models without ESODLoss.
"""

from __future__ import annotations

import functools


def _train():
    from so_det_ultra.highres import train  # loaded on first use: importing the integration stays cheap

    return train


def wrap_loss(original):
    @functools.wraps(original)
    def loss(self, batch, preds=None):
        cfg = _train().train_config(self) if preds is None and self.training else None
        if cfg is not None:
            if getattr(self, "criterion", None) is None:
                self.criterion = self.init_criterion()
            _check_criterion(self.criterion)
            preds = _train().patch_preds(self, batch, cfg, self.criterion)
        return original(self, batch, preds)

    loss.__so_det_ultra__ = True
    return loss


def _check_criterion(criterion):
    from so_det_ultra.losses.esod import ESODLoss

    if not isinstance(criterion, ESODLoss):
        raise ValueError(
            f"model YAML `{_train().KEY}:` (patch training) needs `loss: {{type: ESODLoss}}`, whose loss reads the "
            f"patch predictions; the criterion is {type(criterion).__name__}"
        )


def on_train_start(trainer):
    _train().on_train_start(trainer)


def on_train_epoch_start(trainer):
    _train().on_train_epoch_start(trainer)


CALLBACKS = {"on_train_start": on_train_start, "on_train_epoch_start": on_train_epoch_start}


def install(ledger):
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.callbacks import base

    if not getattr(DetectionModel.loss, "__so_det_ultra__", False):
        ledger.set_class_attr(DetectionModel, "loss", wrap_loss(DetectionModel.loss))
    for event, fn in CALLBACKS.items():
        ledger.append(base.default_callbacks[event], fn, f"{base.__name__}.default_callbacks[{event}]")
