"""Original-frame object areas carried through Ultralytics' augmentation, for ESOD's heatmap weights.

Officially the weight map is drawn once per original frame (``scripts/data_prepare.py`` ``gen_mask``, lines 130-192:
``area = w * h / (width * height) * (1920 * 1080)``) and warped with the image by mosaic and affine augmentation
(``utils/datasets.py``), so an object's weight does not depend on the augmentation scale. Here each object carries its
own area and its frame's area, in original-image pixels, as two extra columns of its ``cls`` row from the moment its
labels are loaded: every Ultralytics transform that drops, reorders or concatenates objects (mosaic, random
perspective, mixup, cutmix) does the same to ``cls``. After ``Format`` the columns are split off into
``batch["esod_area"]`` (one (n, 2) tensor per image) and ``cls`` is the plain (n, 1) again. The integration's dataset
patch (:mod:`so_det_ultra.integration.esod`) applies :func:`widen_cls` and appends :class:`SplitFrameArea`.
"""

from __future__ import annotations

import numpy as np
import torch

from so_det_ultra.losses.esod import AREA_KEY


def widen_cls(label: dict) -> dict:
    """Append ``[object area, frame area]`` (original-image pixels) to each row of ``label["cls"]`` (N, 1) -> (N, 3).

    ``label`` is what Ultralytics' ``BaseDataset.get_image_and_label`` returns: ``instances`` with the boxes as loaded
    (normalised to the original image, or in its pixels) and ``ori_shape`` (h, w) of the original image.
    """
    cls = np.asarray(label["cls"], dtype=np.float32).reshape(-1, 1)
    inst = label["instances"]
    h0, w0 = label["ori_shape"][:2]
    b = np.asarray(inst.bboxes, dtype=np.float32).reshape(-1, 4)
    wh = b[:, 2:4] - b[:, 0:2] if inst._bboxes.format == "xyxy" else b[:, 2:4]
    area = np.abs(wh.prod(1)) * (h0 * w0 if inst.normalized else 1.0)
    frame = np.full_like(area, float(h0 * w0))
    label["cls"] = np.concatenate((cls, area[:, None], frame[:, None]), 1) if len(cls) else np.zeros((0, 3), np.float32)
    return label


class SplitFrameArea:
    """Last transform: the two area columns of ``cls`` go to ``labels["esod_area"]`` (n, 2), ``cls`` is (n, 1) again."""

    def __call__(self, labels: dict) -> dict:
        cls = labels["cls"]
        if cls.ndim == 2 and cls.shape[1] == 3:
            labels[AREA_KEY] = cls[:, 1:3].float()
            labels["cls"] = cls[:, :1]
        else:  # an image without objects: Format writes zeros(0, 1)
            labels[AREA_KEY] = torch.zeros(len(cls), 2)
        return labels
