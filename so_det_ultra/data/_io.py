"""File helpers of the dataset converters: atomic, change-only writes, image placement, archives, stale files.

Every output file is written to a temporary file in the same folder and moved into place with :func:`os.replace`,
so an interrupted run never leaves a half-written label or image behind. A file whose bytes would not change is not
rewritten at all, which keeps reruns idempotent down to the modification times (Ultralytics' label cache stays
valid). Temporary files are named after the process that writes them (``.<name>.<pid>-<random>.tmp``); those a killed
run left behind are removed by the next run (:func:`remove_temp`), never those of a process that is still running.
Every file written here gets the permissions a new file gets from the umask (``0o666 & ~umask``: 0644 under the
usual umask 022), also when it is a copy of a source image with other permissions.

Fault injection for tests: with ``SO_DET_FAULT_KILL_AFTER=N`` in the environment, the process SIGKILLs itself right
after its N-th temporary file is complete and before it is moved into place (the worst moment for a crash).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import zipfile
from pathlib import Path

IMAGE_MODES = ("copy", "hardlink", "symlink")
TEMP_GLOB = ".*.tmp"  # names of the temporary files below: ".<name>.<pid>-<random>.tmp"
TEMP_RE = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp$")
FAULT_ENV = "SO_DET_FAULT_KILL_AFTER"
_writes = [0]  # temporary files completed in this process (for FAULT_ENV)


def _fault_point() -> None:
    """SIGKILL this process after the N-th completed temporary file when ``$SO_DET_FAULT_KILL_AFTER`` is N."""
    n = os.environ.get(FAULT_ENV)
    if n:
        _writes[0] += 1
        if _writes[0] >= int(n):
            os.kill(os.getpid(), signal.SIGKILL)


def os_error_text(err: OSError) -> str:
    """``str(err)``, with the path(s) it concerns added when the message lacks them (``[Errno 2] ...: 'path'``)."""
    text = str(err)
    for name in (err.filename, err.filename2):
        if name is not None and str(name) not in text:
            text += f": {name!r}" if not text.endswith(":") else f" {name!r}"
    return text


def temp_path(path: Path) -> Path:
    """A fresh temporary name next to ``path``, owned by this process: ``.<name>.<pid>-<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def pid_alive(pid: int) -> bool:
    """True when a process with id ``pid`` exists (on this machine)."""
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would send CTRL_C_EVENT; assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists under another user, or the platform cannot tell: keep its files
    return True


def remove_temp(folder: Path) -> int:
    """Delete the temporary files that dead processes left directly inside ``folder``; return how many.

    Only names of the form :func:`temp_path` writes are considered, and only when the process named in them is gone.
    """
    folder = Path(folder)
    n = 0
    for p in folder.glob(TEMP_GLOB) if folder.is_dir() else ():
        m = TEMP_RE.match(p.name)
        if m and not pid_alive(int(m.group(1))) and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
            n += 1
    return n


def file_mode() -> int:
    """Permission bits a new file gets under the current umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless the file already holds exactly these bytes. True if written."""
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _fault_point()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    tmp = temp_path(dst)
    try:
        if mode == "copy":
            shutil.copy2(src, tmp)
            os.chmod(tmp, file_mode())  # copy2 copied the source's permissions; the output follows the umask
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


def remove_stale(folder: Path, keep: set, owned) -> list[Path]:
    """Delete the files in ``folder`` (not recursive) whose names are not in ``keep`` and for which ``owned(path)`` is
    true; return the paths removed. Files a conversion did not write (``owned`` false) are never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if p.name not in keep and (p.is_file() or p.is_symlink()) and not TEMP_RE.match(p.name) and owned(p):
            p.unlink()
            removed.append(p)
    return removed


def _is_link(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)  # Unix mode bits (zip "made by" Unix)


def extract_archive(archive: Path, into: Path) -> Path:
    """Unzip ``archive`` into ``into`` (created); refuses members that would land outside it and symbolic links.

    Returns ``into``. Every refusal or OS error is a ``ValueError`` that names the archive and the member.
    """
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    root = into.resolve()
    hint = "unzip it yourself and pass the unpacked folder as SRC"
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            m = info.filename
            if root not in (root / m).resolve().parents and (root / m).resolve() != root:
                raise ValueError(f"{archive}: member {m!r} would be extracted outside {root}")
            if _is_link(info):
                raise ValueError(
                    f"{archive}: member {m!r} is a symbolic link, which the converter does not unpack; {hint}"
                )
        for info in z.infolist():
            try:
                z.extract(info, into)
            except OSError as err:
                raise ValueError(
                    f"{archive}: member {info.filename!r} cannot be unpacked ({err.strerror or err}); {hint}"
                ) from err
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
    except Image.DecompressionBombError as err:
        return None, f"image too large to decode safely ({err}); shrink or tile it before converting"
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
