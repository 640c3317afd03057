"""Dense prediction (stock ``YOLO.predict`` on the whole frame), the baseline of the high-resolution predictors.

Same inputs and outputs as :func:`~so_det_ultra.highres.sparse.sparse_predict` and
:func:`~so_det_ultra.highres.sliced.sliced_predict`: a model and one or more images in, one Ultralytics ``Results``
per image out, with the source path kept (``YOLO.predict`` on an array would call it ``image0.jpg``).
"""

from __future__ import annotations

from so_det_ultra.highres.common import read_images


def dense_predict(
    model, source, *, imgsz=None, conf: float = 0.25, iou: float = 0.7, max_det: int = 10000, device="cpu"
) -> list:
    """``YOLO.predict`` on each image of ``source`` at ``imgsz`` (None: the image's own long side).

    Args:
        model: A ``.pt`` checkpoint or model YAML path, or a ``YOLO``.
        source: An image path, folder, BGR array, or a list of those (see ``common.read_images``).
        imgsz (int, optional): Long side of the network input; None keeps each image's resolution.
        conf (float): Confidence threshold.
        iou (float): NMS IoU threshold (Ultralytics' default).
        max_det (int): Maximum detections per image (high: crowded drone frames hold 1000+ objects).
        device: Torch device.

    Returns:
        (list[Results]): One per image.
    """
    from ultralytics import YOLO

    model = model if isinstance(model, YOLO) else YOLO(str(model))
    results = []
    for path, img in read_images(source):
        size = imgsz or max(img.shape[:2])
        r = model.predict(img, imgsz=size, conf=conf, iou=iou, max_det=max_det, device=device, verbose=False)[0]
        r.path = path
        results.append(r)
    return results
