"""File helpers of every command that writes a folder: safe temporary files, atomic writes, links, archives.

Every output file is written to a temporary file in the same folder and moved into place with :func:`os.replace`,
so an interrupted run never leaves a half-written file behind. Temporary files are created with exclusive,
no-follow flags (``O_CREAT | O_EXCL | O_NOFOLLOW``) under unpredictable names that carry the writer's PID
(``.<name>.<pid>-<random>.tmp``, or ``.<name>.<pid>-<random>.tmp<suffix>`` where a writer picks its format from the
suffix); those a killed run left behind are removed by the next run (:func:`remove_temp`), never those of a process
that is still running. A file whose bytes would not change is not rewritten at all, which keeps reruns idempotent
down to the modification times (Ultralytics' label cache stays valid). Every file written here gets the permissions a
new file gets from the umask (``0o666 & ~umask``: 0644 under the usual umask 022), also when it is a copy of a source
image with other permissions.

Links: :func:`check_inside` refuses a path whose folders below the output root include a symbolic link, so no write
or deletion lands outside the output folder; :func:`os.replace` onto a link replaces the link itself. An OS error
raised while a file is written names that file.

Fault injection for tests: with ``SO_DET_FAULT_KILL_AFTER=N`` in the environment, the process SIGKILLs itself right
after its N-th temporary file is complete and before it is moved into place (the worst moment for a crash).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import zipfile
from contextlib import contextmanager
from pathlib import Path

IMAGE_MODES = ("copy", "hardlink", "symlink")
TEMP_GLOB = ".*.tmp*"  # names of the temporary files below: ".<name>.<pid>-<random>.tmp[<suffix>]"
TEMP_RE = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp(\.[A-Za-z0-9]+)?$")
FAULT_ENV = "SO_DET_FAULT_KILL_AFTER"
NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; Windows has no symbolic links a user creates by accident
_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)
_writes = [0]  # temporary files completed in this process (for FAULT_ENV)


class DestinationError(ValueError):
    """An output folder or file cannot be used as asked (guard, link, ownership or lock); the message says what to
    do."""


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


@contextmanager
def naming(path):
    """An OS error of the block that names no file (a full disk) is raised naming ``path``: ``[Errno 28] No space
    left on device: 'path'``."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise


@contextmanager
def _writing(tmp: Path, path):
    """:func:`naming` ``path``; ``tmp`` is removed if the block fails."""
    try:
        with naming(path):
            yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_inside(path, root) -> Path:
    """``path`` if it lies lexically inside ``root`` and no folder or file between them is a symbolic link.

    ``root`` itself may be a link (a DST the user pointed somewhere). Raises :class:`DestinationError` naming the
    link: so-det-ultra never writes, deletes or unpacks through a link it did not make.
    """
    path, root = Path(path), Path(root)
    try:
        rel = Path(os.path.normpath(path)).relative_to(os.path.normpath(root))
    except ValueError:
        raise DestinationError(f"{path} lies outside the output folder {root}; nothing is written there") from None
    if ".." in rel.parts:
        raise DestinationError(f"{path} lies outside the output folder {root}; nothing is written there")
    cur = root
    for part in rel.parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise DestinationError(
                f"{cur} is a symbolic link (to {os.readlink(cur)}); so-det-ultra writes only into real folders "
                f"inside {root}: remove the link (or replace it by a folder), or write elsewhere"
            )
    return path


def temp_path(path: Path, keep_suffix: bool = False) -> Path:
    """A fresh temporary name next to ``path``, owned by this process: ``.<name>.<pid>-<random>.tmp``, with
    ``keep_suffix`` ``.<stem>.<pid>-<random>.tmp<suffix>`` (OpenCV picks the format from the suffix)."""
    path = Path(path)
    token = f"{os.getpid()}-{secrets.token_hex(8)}.tmp"
    if keep_suffix and path.suffix:
        return path.with_name(f".{path.stem}.{token}{path.suffix}")
    return path.with_name(f".{path.name}.{token}")


def create_temp(path, keep_suffix: bool = False) -> tuple[int, Path]:
    """``(fd, temporary path)`` of a new, empty file next to ``path``, opened for writing with exclusive, no-follow
    flags (an existing file or link of that name is never opened)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for _ in range(8):
        tmp = temp_path(path, keep_suffix)
        try:
            return os.open(tmp, _EXCLUSIVE, 0o666), tmp  # umask applies
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def write_temp(path, data: bytes) -> Path:
    """A complete temporary file next to ``path`` holding ``data``; an OS error (full disk) names ``path``."""
    fd, tmp = create_temp(path)
    with _writing(tmp, path):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _fault_point()
    return tmp


def copy_temp(src, path) -> Path:
    """A temporary copy of ``src`` next to ``path``, with ``src``'s modification time and the umask's permissions."""
    st = os.stat(src)
    fd, tmp = create_temp(path)
    with _writing(tmp, path):
        with os.fdopen(fd, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        _fault_point()
    return tmp


def link_temp(src, path, mode: str) -> Path:
    """A temporary hardlink (``mode`` ``hardlink``) or symbolic link to ``src``'s resolved path next to ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for _ in range(8):
        tmp = temp_path(path)
        try:
            os.link(src, tmp) if mode == "hardlink" else os.symlink(Path(src).resolve(), tmp)
            _fault_point()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def same_bytes(path, data: bytes) -> bool:
    """True when ``path`` is a regular file (not a link) holding exactly ``data``."""
    try:
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_size == len(data) and Path(path).read_bytes() == data
    except FileNotFoundError:
        return False


def same_placement(src, dst, mode: str) -> bool:
    """True when ``dst`` already is ``src`` placed by ``mode``: a copy with its size and modification time (what a
    copy keeps), a hardlink to it, or a symbolic link to its resolved path."""
    src, dst = Path(src), Path(dst)
    if mode == "symlink":
        return dst.is_symlink() and Path(os.readlink(dst)) == src.resolve()
    if dst.is_symlink() or not dst.is_file():
        return False
    s, d = src.stat(), dst.stat()
    if mode == "hardlink":
        return os.path.samefile(src, dst)
    return d.st_size == s.st_size and d.st_mtime_ns == s.st_mtime_ns


def place_temp(src, path, mode: str = "copy") -> Path:
    """A temporary file next to ``path`` that is ``src`` placed by ``mode`` (``copy``, ``hardlink``, ``symlink``)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode must be one of {IMAGE_MODES}, got {mode!r}")
    return copy_temp(src, path) if mode == "copy" else link_temp(src, path, mode)


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
    """Delete the temporary files and work folders that dead processes left directly inside ``folder``; return how
    many.

    Only names of the form :func:`temp_path` writes are considered, and only when the process named in them is gone;
    a link of such a name is removed as a link, never followed.
    """
    folder = Path(folder)
    n = 0
    for p in folder.glob(TEMP_GLOB) if folder.is_dir() and not folder.is_symlink() else ():
        m = TEMP_RE.match(p.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def work_dir(parent, name: str) -> Path:
    """A fresh work folder name under ``parent`` owned by this run (``.<name>.<pid>-<random>.tmp``), not created;
    a folder of the user's called ``name`` is never touched, and a dead run's is swept by :func:`remove_temp`."""
    return temp_path(Path(parent) / name)


def file_mode() -> int:
    """Permission bits a new file gets under the current umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` atomically unless the file already holds exactly these bytes. True if written.

    A link at ``path`` is replaced by the file, never written through. With ``replace=False`` nothing at ``path`` is
    ever replaced, not even one that appears while the data is written (another run's): FileExistsError instead.
    """
    path = Path(path)
    if replace and same_bytes(path, data):
        return False
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path) if replace else _move_new(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _move_new(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` only if nothing is there: a hard link fails atomically on any existing name."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists; nothing was replaced", str(path)) from None
    except OSError as err:  # a file system without hard links: check, then rename (a narrow race remains)
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists; nothing was replaced", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_write_text(path: Path, text: str, replace: bool = True) -> bool:
    """:func:`atomic_write_bytes` for UTF-8 text (``\\n`` line ends on every OS)."""
    return atomic_write_bytes(path, text.encode("utf-8"), replace)


def json_text(obj) -> str:
    """Compact, key-ordered JSON (deterministic bytes) with a final newline."""
    return json.dumps(obj, separators=(",", ":")) + "\n"


def stale_files(folder: Path, keep: set, owned) -> list[Path]:
    """The files in ``folder`` (not recursive) whose names are not in ``keep`` and for which ``owned(path)`` is true:
    what a rerun removes as stale. Files a run did not write (``owned`` false) are never listed; a folder that is a
    link has none."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    return [
        p
        for p in sorted(folder.iterdir())
        if p.name not in keep and (p.is_file() or p.is_symlink()) and not TEMP_RE.match(p.name) and owned(p)
    ]


def _is_link(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)  # Unix mode bits (zip "made by" Unix)


def extract_archive(archive: Path, into: Path) -> Path:
    """Unzip ``archive`` into ``into`` (created; a work folder of this run, see :func:`work_dir`); refuses members
    that would land outside it and symbolic links.

    Returns ``into``. Every refusal or OS error is a ``ValueError`` that names the archive and the member.
    """
    into = Path(into)
    if into.is_symlink() or (into.exists() and not into.is_dir()):
        raise DestinationError(f"{into} is not a folder this run made; nothing is unpacked there")
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
