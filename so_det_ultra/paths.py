"""Where the shipped YAMLs live, and how a bare name such as ``so-det-s.yaml`` maps to one of them."""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent
SCALED_NAME = re.compile(r"^(?P<base>.+)-(?P<scale>[nsmlx])$")  # so-det-s, so-det-rtdetr-l
ULTRALYTICS_SCALED = re.compile(r"(\d+)([nslmx])(.+)?$")  # yolov8n-sgdm -> yolov8-sgdm (Ultralytics' own rule)


@cache
def cfg_root() -> Path:
    """``so_det_ultra/cfg`` in an installed wheel, ``<repo>/cfg`` in a source checkout or editable install."""
    for root in (_PKG / "cfg", _PKG.parent / "cfg"):
        if (root / "models").is_dir():
            return root
    raise FileNotFoundError(
        f"so-det-ultra's cfg/ folder is missing (looked in {_PKG / 'cfg'} and {_PKG.parent / 'cfg'})"
    )


def _names(folder: str) -> frozenset:
    d = cfg_root() / folder
    return frozenset(os.listdir(d)) if d.is_dir() else frozenset()  # exact, case-sensitive names on every OS


def model_cfg(name) -> Path | None:
    """The shipped model YAML for a bare name, else None.

    Tried in order: the exact file, ``<family>-<scale>.yaml`` -> ``<family>.yaml``, and Ultralytics' own scale rule
    (``yolov8n-sgdm.yaml`` -> ``yolov8-sgdm.yaml``).
    """
    name = str(name)
    if os.sep in name or "/" in name or not name.endswith((".yaml", ".yml")):
        return None
    stem, suffix = os.path.splitext(name)
    names = _names("models")
    candidates = [name]
    if m := SCALED_NAME.match(stem):
        candidates.append(m["base"] + suffix)
    candidates.append(ULTRALYTICS_SCALED.sub(r"\1\3", stem) + suffix)
    for c in candidates:
        if c in names:
            return cfg_root() / "models" / c
    return None


def dataset_cfg(name) -> Path | None:
    """The shipped dataset YAML of that exact bare name, e.g. ``visdrone.yaml``."""
    name = str(name)
    if os.sep in name or "/" in name:
        return None
    return cfg_root() / "datasets" / name if name in _names("datasets") else None


def family_scale(path) -> str:
    """Scale letter of a name in one of our model families (``so-det-s.yaml`` -> ``s``), else ``""``."""
    stem = Path(str(path)).stem
    m = SCALED_NAME.match(stem)
    return m["scale"] if m and (m["base"] + ".yaml") in _names("models") else ""
