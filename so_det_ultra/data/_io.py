"""File helpers of the dataset converters: atomic, change-only writes, image placement, archives, stale files.

Every output file is written to a temporary file in the same folder and moved into place with :func:`os.replace`,
so an interrupted run never leaves a half-written label or image behind. A file whose bytes would not change is not
rewritten at all, which keeps reruns idempotent down to the modification times (Ultralytics' label cache stays
valid). Temporary files a killed run left behind (``.<name>.*.tmp``) are removed by the next run
(:func:`remove_temp`).

Fault injection for tests: with ``SO_DET_FAULT_KILL_AFTER=N`` in the environment, the process SIGKILLs itself right
after its N-th temporary file is complete and before it is moved into place (the worst moment for a crash).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import zipfile
from pathlib import Path

IMAGE_MODES = ("copy", "hardlink", "symlink")
TEMP_GLOB = ".*.tmp"  # names of the temporary files below: ".<name>.<random or pid>.tmp"
FAULT_ENV = "SO_DET_FAULT_KILL_AFTER"
_writes = [0]  # temporary files completed in this process (for FAULT_ENV)


def _fault_point() -> None:
    """SIGKILL this process after the N-th completed temporary file when ``$SO_DET_FAULT_KILL_AFTER`` is N."""
    n = os.environ.get(FAULT_ENV)
    if n:
        _writes[0] += 1
        if _writes[0] >= int(n):
            os.kill(os.getpid(), signal.SIGKILL)


def remove_temp(folder: Path) -> int:
    """Delete the temporary files (:data:`TEMP_GLOB`) a killed run left directly inside ``folder``; return how many."""
    folder = Path(folder)
    n = 0
    for p in folder.glob(TEMP_GLOB) if folder.is_dir() else ():
        if p.is_file() or p.is_symlink():
            p.unlink()
            n += 1
    return n


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
        _fault_point()
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
        _fault_point()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


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


def image_size(path: Path):
    """(width, height) from the image header; ``None`` if unreadable. See :func:`image_check` for the reason."""
    size, _ = image_check(path)
    return size


def image_check(path: Path):
    """``((width, height), None)`` for a complete image, ``(None, reason)`` for a missing, unreadable or cut one.

    Cheap: the header gives the size; completeness is checked at the end of the file for JPEG (the EOI marker
    ``FFD9``, as Ultralytics' dataset check does) and PNG (the ``IEND`` chunk); other formats are decoded in full.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
            if fmt not in ("JPEG", "PNG"):
                im.load()
        with open(path, "rb") as f:
            f.seek(-12, os.SEEK_END)
            tail = f.read()
    except FileNotFoundError:
        return None, "missing image"
    except Exception as err:  # any decoder or OS error means "unreadable" to the caller
        return None, f"unreadable image ({type(err).__name__}: {err})"
    if (fmt == "JPEG" and tail[-2:] != b"\xff\xd9") or (fmt == "PNG" and b"IEND" not in tail):
        return None, f"truncated image (no {fmt} end marker)"
    return size, None


def read_image(path: Path):
    """BGR array of the image at ``path``; OSError if it cannot be read."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"could not read {path}")
    return img


def encode(img, suffix: str) -> bytes:
    """Image bytes in the format of ``suffix`` (JPEG at quality 95); deterministic for the same pixels."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(suffix.lower(), img, params)
    if not ok:
        raise OSError(f"could not encode a {suffix} image")
    return buf.tobytes()
