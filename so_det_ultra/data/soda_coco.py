"""Reading one SODA-D split JSON (COCO format) for the converter (:mod:`so_det_ultra.data.soda`).

Rules (the converter's docstring and docs/datasets.md give the whole protocol):

- classes: the JSON's categories other than ``ignore``, sorted by category id, become 0..n-1 with their JSON names;
- an annotation of the ``ignore`` category is an ignored region. ``flags`` says how the ``ignore``/``iscrowd``
  flags of the other annotations are read. ``official``: an object flagged ``ignore`` stays an object (the official
  split, github shaunyuan22/SODA-mmdetection ``tools/img_split/sodad_split.py``, recomputes ``ignore`` per tile from
  the visible fraction, line 295, and writes ``iscrowd`` 0, line 297), and is recorded in :attr:`Coco.flagged` as
  ignored ground truth for evaluation (``mmdet/datasets/sodad_eval/sodadeval.py`` reads ``gt['ignore']``, line 115,
  and sets ``_ignore``, line 267; ``generate_wo_ignore.py`` removes only category 10, lines 15-16); ``iscrowd`` is
  not read (``sodadeval.py`` line 277 treats every ground truth as non-crowd). ``region``: either flag makes the
  annotation an ignored region (the earlier reading);
- malformed annotations (missing keys, bbox not 4 finite numbers, zero or negative size, unknown image or category
  id, box entirely outside the image) are reported as ``file:annotations[k]: reason``, counted and skipped; a split
  JSON that is empty, unreadable or not COCO raises :class:`~so_det_ultra.data.converter.UnusableSource`;
- boxes partly outside the image are clipped to it (:func:`~so_det_ultra.data.contract.clip_box`);
- the extent of an image's annotations, ``max(int(x) + int(w))`` and ``max(int(y) + int(h))`` over all of them (the
  ``ignore`` category included), as ``SODADSplit._getImgExAnn`` (lines 363-372) computes it, for the training
  extent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from so_det_ultra.data import contract
from so_det_ultra.data._summary import Summary
from so_det_ultra.data.contract import Annotation
from so_det_ultra.data.converter import UnusableSource

FLAGS = ("official", "region")  # how `ignore`/`iscrowd` flags of object annotations are read


class Coco(NamedTuple):
    """One parsed split JSON (:func:`load_coco`)."""

    names: dict  # class index -> name
    images: dict  # image id -> (file_name, width, height)
    anns: dict  # image id -> Annotation (pixel xyxy, clipped)
    extents: dict  # image id -> (xmax, ymax) of its annotations, ``int(x) + int(w)`` as the official split
    flagged: dict  # image id -> indices into its objects flagged ``ignore`` (ignored ground truth, ``flags`` official)


def _read_coco(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise UnusableSource(f"empty annotation file ({len(text.encode())} bytes)")
        coco = json.loads(text)
    except UnusableSource:
        raise
    except (OSError, ValueError) as err:
        raise UnusableSource(f"not a readable JSON file ({err})") from err
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "categories")):
        raise UnusableSource("not a COCO detection file (needs 'images' and 'categories' lists)")
    return coco


def _checked_box(a: dict, images: dict, cats: dict, where: str, summary: Summary):
    """``((x, y, w, h), clipped xyxy)`` of annotation ``a``, or None (reported) when it is malformed."""
    try:
        x, y, w, h = (float(v) for v in a["bbox"])
        if not all(map(math.isfinite, (x, y, w, h))):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        return summary.problem(where, "bbox is not 4 finite numbers")
    if a.get("image_id") not in images:
        return summary.problem(where, f"unknown image_id {a.get('image_id')!r}")
    if a.get("category_id") not in cats:
        return summary.problem(where, f"unknown category_id {a.get('category_id')!r}")
    if w <= 0 or h <= 0:
        return summary.problem(where, "zero or negative box size")
    _, iw, ih = images[a["image_id"]]
    box = contract.clip_box(x, y, x + w, y + h, iw, ih)
    return summary.problem(where, "box outside the image") if box is None else ((x, y, w, h), box)


def load_coco(path: Path, summary: Summary, flags: str = "official") -> Coco:
    """Parse one SODA-D/COCO JSON into a :class:`Coco` (objects' truncation/occlusion are ``None``); ``flags`` as
    :func:`convert_soda` describes it."""
    path, coco = Path(path), _read_coco(Path(path))
    cats = {c["id"]: str(c["name"]) for c in coco["categories"]}
    ignore_ids = {i for i, n in cats.items() if n.lower() == "ignore"}
    kept = sorted(i for i in cats if i not in ignore_ids)
    cls_of = {cid: k for k, cid in enumerate(kept)}
    images = {}
    for k, im in enumerate(coco["images"]):
        try:
            images[im["id"]] = (str(im["file_name"]), int(im["width"]), int(im["height"]))
        except (KeyError, TypeError, ValueError):
            summary.problem(f"{path}:images[{k}]", "image record without id/file_name/width/height")
    out = Coco({k: cats[cid] for k, cid in enumerate(kept)}, images, {i: Annotation() for i in images}, {}, {})
    for k, a in enumerate(coco.get("annotations", [])):
        if (checked := _checked_box(a, images, cats, f"{path}:annotations[{k}]", summary)) is None:
            continue
        (x, y, w, h), box = checked
        i, ann = a["image_id"], out.anns[a["image_id"]]
        ex, ey = out.extents.get(i, (0, 0))
        out.extents[i] = max(ex, int(x) + int(w)), max(ey, int(y) + int(h))
        if a["category_id"] in ignore_ids or (flags == "region" and (a.get("ignore") or a.get("iscrowd"))):
            ann.ignore.append([contract.coord(v) for v in box])
            summary.ignore_regions += 1
            summary.skipped["ignore annotation -> sidecar"] += 1
            continue
        if a.get("ignore"):
            out.flagged.setdefault(i, set()).add(len(ann.objects))
        ann.objects.append(contract.ObjectBox(cls_of[a["category_id"]], *box))
        summary.clipped += box != (x, y, x + w, y + h)
    return out
