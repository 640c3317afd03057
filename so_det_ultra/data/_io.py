"""File helpers shared by the dataset converters: atomic, change-only writes and a guard for the source tree.

Every output file is written to a temporary file in the same folder and moved into place with :func:`os.replace`,
so an interrupted run never leaves a half-written label or image behind. A file whose bytes would not change is not
rewritten at all, which keeps reruns idempotent down to the modification times (Ultralytics' label cache stays
valid).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_MODES = ("copy", "hardlink", "symlink")


def atomic_write_bytes(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless the file already holds exactly these bytes. True if written."""
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def atomic_write_text(path: Path, text: str) -> bool:
    """:func:`atomic_write_bytes` for UTF-8 text (``\\n`` line ends on every OS)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> bool:
    """Compact, key-ordered JSON (deterministic bytes), written atomically."""
    return atomic_write_text(path, json.dumps(obj, separators=(",", ":")) + "\n")


def place_image(src: Path, dst: Path, mode: str = "copy") -> bool:
    """Put the source image at ``dst`` (``copy`` keeps the mtime, ``hardlink``, ``symlink``); skip if already there.

    A copy counts as "already there" when size and modification time match the source (what ``copy2`` preserves).
    The source file is only read, never moved or modified.
    """
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode must be one of {IMAGE_MODES}, got {mode!r}")
    src, dst = Path(src), Path(dst)
    st = src.stat()
    if dst.is_symlink() or dst.exists():
        if mode == "symlink":
            if dst.is_symlink() and Path(os.readlink(dst)) == src.resolve():
                return False
        elif not dst.is_symlink():
            d = dst.stat()
            if (mode == "hardlink" and os.path.samefile(src, dst)) or (
                mode == "copy" and d.st_size == st.st_size and d.st_mtime_ns == st.st_mtime_ns
            ):
                return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if mode == "copy":
            shutil.copy2(src, tmp)
        elif mode == "hardlink":
            os.link(src, tmp)
        else:
            os.symlink(src.resolve(), tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def check_dst(src: Path, dst: Path) -> None:
    """Refuse output touching the source: ``dst`` equal to or inside ``src``, or ``src`` inside an output folder.

    ``src`` is one source split folder (or annotation file); ``dst`` may contain it (e.g. the official folders
    unzipped into the dataset root), as long as it is not under ``dst/images``, ``dst/labels`` or ``dst/sidecars``.
    """
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s or s in d.parents:
        raise ValueError(f"output folder {d} must not be the source folder {s} or inside it: the source is read-only")
    for owned in ("images", "labels", "sidecars"):
        if (d / owned) == s or (d / owned) in s.parents:
            raise ValueError(f"source {s} lies inside the output folder {d / owned}, which the converter rewrites")


def remove_stale(folder: Path, keep: set) -> int:
    """Delete files in ``folder`` (not recursive) whose names are not in ``keep``; return how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.iterdir():
        if p.name not in keep and (p.is_file() or p.is_symlink()):
            p.unlink()
            n += 1
    return n


def extract_archive(archive: Path, into: Path) -> Path:
    """Unzip ``archive`` into ``into`` (created); refuses members that would land outside it. Returns ``into``."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    root = into.resolve()
    with zipfile.ZipFile(archive) as z:
        for m in z.namelist():
            if root not in (root / m).resolve().parents and (root / m).resolve() != root:
                raise ValueError(f"{archive}: member {m!r} would be extracted outside {root}")
        z.extractall(into)
    return into


def find_image(folder: Path, stem: str, index: dict | None = None) -> Path | None:
    """The image ``folder/stem.<ext>`` for any usual image suffix (``index``: optional prebuilt stem -> path map)."""
    if index is not None:
        return index.get(stem)
    for suffix in IMAGE_SUFFIXES:
        for s in (suffix, suffix.upper()):
            if (p := Path(folder) / f"{stem}{s}").is_file():
                return p
    return None


def image_index(folder: Path) -> dict:
    """``{stem: path}`` for every image file directly inside ``folder`` (first suffix in sorted order wins)."""
    out = {}
    if Path(folder).is_dir():
        for p in sorted(Path(folder).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                out.setdefault(p.stem, p)
    return out


def find_local_source(data: dict, env: str, found, missing: str) -> Path:
    """The folder a dataset YAML's offline ``download:`` step converts from.

    Looks, in order, in ``$env``, in ``data['path']`` and in its parent (Ultralytics' ``datasets_dir`` for a relative
    ``path``) for a folder where ``found(folder)`` is true; raises FileNotFoundError with ``missing`` (formatted with
    ``where`` and ``env``) otherwise. Never downloads.
    """
    root = Path(data["path"])
    candidates = [Path(os.environ[env])] if os.environ.get(env) else []
    candidates += [root, root.parent]
    for c in candidates:
        if c.is_dir() and found(c):
            return c
    raise FileNotFoundError(missing.format(where=" or ".join(map(str, candidates)), env=env))


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    """Ultralytics' dependency-free progress bar around ``iterable`` (plain iteration when disabled)."""
    if not enabled:
        return iterable
    from ultralytics.utils import TQDM  # lazy: importing Ultralytics costs about a second

    return TQDM(iterable, desc=desc, total=total, disable=False)
