"""Predictions: a ``predictions.json`` read and checked, and its COCO result rows grouped per evaluated image.

The file rules are in docs/metrics.md ("Predictions file rules"); rows are what ``yolo val save_json=True`` writes
(``image_id`` = file stem, ``category_id`` = class index + 1, ``bbox`` = ``[x, y, w, h]`` pixels, ``score``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from so_det_ultra.metrics.truth import image_index


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _good_row(r: dict) -> bool:
    b = r["bbox"]
    return (
        isinstance(b, (list, tuple)) and len(b) == 4 and all(map(_finite, b)) and b[2] >= 0 and b[3] >= 0
    ) and _finite(r["score"])


def load_predictions(path) -> list:
    """A ``predictions.json`` (list of COCO result rows) with a clear error for anything else.

    The rules (docs/metrics.md, "Predictions file rules"): the file is UTF-8 JSON holding a list (``[]``: no
    detections); each row has ``image_id``, ``category_id``, ``bbox`` and ``score``; ``bbox`` is 4 finite numbers
    ``[x, y, w, h]`` with ``w, h >= 0``; ``score`` is a finite number. Rows naming images or categories outside the
    split are errors raised when the rows are matched to the ground truth (:func:`group_predictions`).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file breaks a rule; the message names the file, the rule and the first offending row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected a JSON list") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected a JSON list of rows ('[]' for no detections)")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    check_rows(rows, path)
    return rows


def check_rows(rows, where) -> None:
    """Raise ValueError naming ``where`` unless ``rows`` is a list of well-formed COCO result rows (the rules of
    :func:`load_predictions`; also what ``so-det merge-predictions`` checks in each shard's records)."""
    if not isinstance(rows, list) or (
        rows and not all(isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys() for r in rows)
    ):
        raise ValueError(
            f"{where}: expected a JSON list of {{image_id, category_id, bbox, score}} rows, as written "
            "by 'yolo val save_json=True'"
        )
    bad = [k for k, r in enumerate(rows) if not _good_row(r)]
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} of {len(rows)} rows have a bbox that is not 4 finite numbers [x, y, w, h] with "
            f"w, h >= 0, or a score that is not a finite number (first: row {bad[0]}, {rows[bad[0]]})"
        )


def group_predictions(predictions, files, nc: int) -> list[tuple]:
    """COCO result rows -> per image of ``files`` (boxes xyxy, scores, classes), with clear errors for rows that do
    not fit (an image outside ``files``, a category outside ``1..nc``)."""
    keys = image_index(files)
    per = [([], [], []) for _ in files]
    unknown, bad_cat = [], []
    for d in predictions:
        i = keys.get(str(d.get("file_name", ""))) if "file_name" in d else None
        i = keys.get(str(d.get("image_id"))) if i is None else i
        if i is None:
            unknown.append(d.get("file_name", d.get("image_id")))
            continue
        c = d.get("category_id")
        if not isinstance(c, (int, np.integer)) or not 1 <= c <= nc:
            bad_cat.append(c)
            continue
        x, y, w, h = (float(v) for v in d["bbox"])
        per[i][0].append([x, y, x + w, y + h])
        per[i][1].append(float(d["score"]))
        per[i][2].append(int(c) - 1)
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions name images that are not in this split (first: "
            f"{sorted(set(map(str, unknown)))[:3]}); check --split and that image_id is the file stem"
        )
    if bad_cat:
        raise ValueError(
            f"{len(bad_cat)} predictions have category_id outside 1..{nc} (first: {bad_cat[:3]}); "
            "expected Ultralytics' non-COCO convention category_id = class index + 1"
        )
    return [
        (np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(s, dtype=np.float64), np.asarray(c, dtype=np.int64))
        for b, s, c in per
    ]
