"""ESOD training seams: patch training through ``DetectionModel.loss``, original-frame areas, two trainer callbacks.

- ``DetectionModel.loss`` (class attribute; inherited from ``BaseModel`` before): a model whose YAML has an
  ``esod_train:`` key computes its training predictions on uniform patches
  (:func:`so_det_ultra.training.esod.patch_preds`, given the trainer's epoch) instead of
  ``self.forward(batch["img"])``; everything else (eval mode, given ``preds``, models without the key) goes to the
  original unchanged.
- callbacks ``on_train_start`` (ESODLoss's ``cls_ratio`` from the training labels; the trainer's two datasets made to
  carry each object's original-frame area through augmentation into ``batch["esod_area"]``, :func:`carry_areas`,
  which the official heatmap weights read) and ``on_train_epoch_start`` (the epoch handed to patch training's
  warm-up; ``cls_ratio`` carried to a rebuilt EMA). All are no-ops for models without ESODLoss.
"""

from __future__ import annotations

import functools
import weakref

_EPOCH = weakref.WeakKeyDictionary()  # trained model -> (epoch, epochs), the trainer's state at epoch start


def _training():
    # loaded on first use: the losses import Ultralytics' model package, which may be mid-import at install time
    from so_det_ultra.training import esod

    return esod


def _frames():
    from so_det_ultra.training import frames

    return frames


def wrap_loss(original):
    @functools.wraps(original)
    def loss(self, batch, preds=None):
        training = _training()
        cfg = training.train_config(self) if preds is None and self.training else None
        if cfg is not None:
            if getattr(self, "criterion", None) is None:
                self.criterion = self.init_criterion()
            _check_criterion(self.criterion)
            epoch, epochs = _EPOCH.get(self, (0, None))
            preds = training.patch_preds(self, batch, cfg, epoch, epochs)
        return original(self, batch, preds)

    loss.__so_det_ultra__ = True
    return loss


def _check_criterion(criterion):
    from so_det_ultra.losses.esod import ESODLoss

    if not isinstance(criterion, ESODLoss):
        raise ValueError(
            f"model YAML `{_training().KEY}:` (patch training) needs `loss: {{type: ESODLoss}}`, whose loss reads the "
            f"patch predictions; the criterion is {type(criterion).__name__}"
        )


def carry_areas(dataset) -> bool:
    """Make a plain detection ``YOLODataset`` carry original-frame object areas (:mod:`so_det_ultra.training.frames`).

    Changes this dataset object only (not its class): its ``get_image_and_label`` widens ``cls`` and its transforms
    end with :class:`~so_det_ultra.training.frames.SplitFrameArea`, also when ``close_mosaic`` rebuilds them. False
    (nothing changed) for any other dataset.
    """
    from ultralytics.data.dataset import YOLODataset

    if type(dataset) is not YOLODataset or dataset.use_segments or dataset.use_keypoints or dataset.use_obb:
        return False
    if getattr(dataset, "_so_det_ultra_areas", False):
        return True
    dataset.get_image_and_label = _WidenedLoad(dataset.get_image_and_label)
    dataset.build_transforms = _SplitTransforms(dataset.build_transforms)
    dataset.transforms.append(_frames().SplitFrameArea())
    dataset._so_det_ultra_areas = True
    return True


class _WidenedLoad:
    """A dataset's ``get_image_and_label`` whose labels carry the area columns (a class: loader workers pickle it)."""

    def __init__(self, load):
        self.load = load

    def __call__(self, index):
        return _frames().widen_cls(self.load(index))


class _SplitTransforms:
    """A dataset's ``build_transforms`` ending with the area split (``close_mosaic`` rebuilds the transforms)."""

    def __init__(self, build):
        self.build = build

    def __call__(self, hyp=None):
        transforms = self.build(hyp)
        transforms.append(_frames().SplitFrameArea())
        return transforms


def _models(trainer):
    from ultralytics.utils.torch_utils import unwrap_model

    return [unwrap_model(trainer.model), getattr(getattr(trainer, "ema", None), "ema", None)]


def on_train_start(trainer):
    """ESODLoss without a YAML ``cls_ratio``: set it from the training labels; say when patch training is on."""
    training = _training()
    models = _models(trainer)
    criteria = training.esod_criteria(models)
    dataset = getattr(getattr(trainer, "train_loader", None), "dataset", None)
    training.set_class_ratio(criteria, dataset)
    if criteria and criteria[0].weights == "official":
        for loader in (getattr(trainer, "train_loader", None), getattr(trainer, "test_loader", None)):
            if loader is not None and carry_areas(loader.dataset) and getattr(loader, "iterator", None) is not None:
                loader.reset()  # workers forked already hold the old dataset
    cfg = training.train_config(models[0]) if models[0] is not None else None
    if cfg is not None:
        from ultralytics.utils import LOGGER

        LOGGER.info(f"ESOD patch training: {training.describe(cfg)}")


def on_train_epoch_start(trainer):
    """Hand the epoch to patch training's warm-up; carry ``cls_ratio`` to a rebuilt EMA."""
    models = _models(trainer)
    if models[0] is not None:
        _EPOCH[models[0]] = (trainer.epoch, trainer.epochs)
    training = _training()
    training.share_class_ratio(training.esod_criteria(models))


CALLBACKS = {"on_train_start": on_train_start, "on_train_epoch_start": on_train_epoch_start}


def install(ledger):
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.callbacks import base

    if not getattr(DetectionModel.loss, "__so_det_ultra__", False):
        ledger.set_class_attr(DetectionModel, "loss", wrap_loss(DetectionModel.loss))
    for event, fn in CALLBACKS.items():
        ledger.append(base.default_callbacks[event], fn, f"{base.__name__}.default_callbacks[{event}]")
