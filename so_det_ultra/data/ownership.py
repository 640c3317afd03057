"""What a conversion may touch in its output folder: path guards, one writer at a time, and a manifest of its files.

- **Guards** (:func:`check_paths`): the output folder may not be empty text, the source itself, inside the source, or
  hold the source, compared on resolved paths (symbolic links and ``..`` followed).
- **Lock** (:func:`dst_lock`): one conversion at a time per output folder, through an OS-level lock on
  ``DST/.so-det.lock`` (the ``filelock`` package: ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows, released by
  the OS when the process dies). The holder writes its PID to ``DST/.so-det.lock.pid``; a second run says which PID
  it waits for, or gives up after ``lock_timeout`` seconds with "DST is being written by PID N".
- **Manifest** (:class:`Ownership`): ``DST/.so-det-manifest.json`` lists every file the conversions wrote there
  (relative paths), with the converter kind, the so-det-ultra version and the options. A run deletes as stale only
  files listed by an earlier run of the same kind, and writes over a file only when a conversion wrote it. A
  non-empty folder without a manifest is refused unless ``force`` is given; forced, the run still deletes nothing it
  did not write, replaces only the names it writes, and counts them in the summary. Before a run writes a file it
  appends the path to ``DST/.so-det-manifest.journal``, so that files of a run killed half-way are still known as
  the conversion's own; the journal is folded into the manifest at the end of the run.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from so_det_ultra import _version
from so_det_ultra.data import _io

MANIFEST = ".so-det-manifest.json"
JOURNAL = ".so-det-manifest.journal"
LOCK = ".so-det.lock"
LOCK_PID = ".so-det.lock.pid"
BOOKKEEPING = (MANIFEST, JOURNAL, LOCK, LOCK_PID)  # never user content, never listed in the manifest
FORMAT = 1


class DestinationError(ValueError):
    """The output folder cannot be used as asked (guard, ownership or lock); the message says what to do."""


def check_paths(src, dst) -> None:
    """Refuse an empty ``dst``, ``dst`` equal to or inside ``src``, and ``src`` inside ``dst`` (resolved paths)."""
    if not str(dst).strip():
        raise DestinationError("the output folder DST is empty text; give a folder, e.g. datasets/visdrone")
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s or s in d.parents:
        raise DestinationError(
            f"output folder {d} must not be the source folder {s} or inside it: the source is read-only"
        )
    if d in s.parents:
        raise DestinationError(
            f"source {s} lies inside the output folder {d}; convert into a folder outside the source"
        )


def _read_pid(dst: Path) -> str:
    try:
        return (dst / LOCK_PID).read_text().strip() or "?"
    except OSError:
        return "?"


@contextmanager
def dst_lock(dst: Path, timeout: float | None = None):
    """Hold the lock of output folder ``dst`` (created) for the block; wait for another run, at most ``timeout`` s."""
    from filelock import FileLock, Timeout

    dst.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dst / LOCK), mode=_io.file_mode())
    try:
        lock.acquire(timeout=0)
    except Timeout:
        from ultralytics.utils import LOGGER

        pid = _read_pid(dst)
        LOGGER.warning(f"{dst} is being written by PID {pid}; waiting for it to finish" + _waiting(timeout))
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise DestinationError(
                f"{dst} is being written by PID {_read_pid(dst)}; wait for it to finish, or convert elsewhere"
            ) from None
    try:
        _io.atomic_write_text(dst / LOCK_PID, f"{os.getpid()}\n")
        yield
    finally:
        (dst / LOCK_PID).unlink(missing_ok=True)
        lock.release()


def _waiting(timeout):
    return "" if timeout is None else f" (at most {timeout:g} s)"


def read_manifest(dst: Path) -> dict | None:
    """The manifest in ``dst``, or None when there is none; a damaged one is a :class:`DestinationError`."""
    path = dst / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("files"), list) or "kind" not in data:
            raise ValueError("not a so-det-ultra manifest")
    except (OSError, ValueError) as err:
        raise DestinationError(
            f"{path} is unreadable ({err}); remove it to treat {dst} as a folder without a manifest (then --force)"
        ) from None
    return data


def foreign_entries(dst: Path, spare=()) -> list[str]:
    """Names directly in ``dst`` other than bookkeeping, temporary files and (ancestors of) the folders in ``spare``."""
    if not dst.is_dir():
        return []
    keep = set()
    for folder in spare:
        f = Path(folder).resolve()
        keep |= {p.name for p in dst.resolve().iterdir() if p.resolve() == f or p.resolve() in f.parents}
    ours = set(BOOKKEEPING) | keep
    return sorted(p.name for p in dst.iterdir() if p.name not in ours and not _io.TEMP_RE.match(p.name))


class Ownership:
    """The files a conversion owns in ``dst``: :meth:`start` (under :func:`dst_lock`), :meth:`claim`, :meth:`finish`."""

    def __init__(self, dst: Path, kind: str, options: dict, owned: set, force: bool):
        self.dst, self.kind, self.options, self.force = Path(dst), kind, options, force
        self.owned = set(owned)  # relative POSIX paths written by earlier runs of this kind (manifest + journal)
        self.written: set = set()  # relative paths this run wrote
        self.overwritten = 0  # files this run replaced that no conversion had written (only with force)
        self._journal = None

    @staticmethod
    def check(dst: Path, kind: str, force: bool = False, spare=()) -> tuple[dict | None, set]:
        """``(earlier manifest, files owned)`` when ``dst`` may be written; :class:`DestinationError` otherwise.

        Read-only: run once before taking the lock (so a refused folder gets no lock file) and again under it.
        """
        dst = Path(dst)
        prev = read_manifest(dst)
        if prev is None:
            there = foreign_entries(dst, spare)
            if there and not force:
                shown = ", ".join(there[:5]) + (f" and {len(there) - 5} more" if len(there) > 5 else "")
                raise DestinationError(
                    f"{dst} is not empty ({shown}) and holds no conversion manifest ({MANIFEST}); choose an empty or "
                    "new folder, or pass --force to convert into it anyway (files it did not write are kept, "
                    "same-named ones replaced)"
                )
            return prev, set()
        if prev["kind"] != kind:
            if not force:
                raise DestinationError(
                    f"{dst} holds a {prev['kind']} conversion; convert {kind} into another folder, or pass --force "
                    f"(the {prev['kind']} files are then kept but no longer managed)"
                )
            return prev, set()
        return prev, {str(f) for f in prev["files"]} | _read_journal(dst)

    @classmethod
    def start(cls, dst: Path, kind: str, options: dict, force: bool = False, spare=()) -> Ownership:
        """Check ``dst`` may be written, record that a run started (manifest, empty journal) and return the owner."""
        dst = Path(dst)
        prev, owned = cls.check(dst, kind, force, spare)
        owner = cls(dst, kind, options, owned, force)
        if prev is None or prev["kind"] != kind:
            owner._write_manifest([])  # first: a run killed from here on leaves a folder recognised as a conversion
        elif owned != {str(f) for f in prev["files"]}:
            owner._write_manifest(sorted(owned))  # a killed run's journal, kept before the journal starts afresh
        owner._journal = open(dst / JOURNAL, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish/close)
        return owner

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.dst).as_posix()

    def is_owned(self, path: Path) -> bool:
        return self.rel(path) in self.owned

    def claim(self, path: Path) -> None:
        """Record ``path`` as this run's before it is written; refuse a file no conversion wrote (unless forced)."""
        rel = self.rel(path)
        if rel in self.written:
            return
        if rel not in self.owned and (path.exists() or path.is_symlink()):
            if not self.force:
                raise DestinationError(
                    f"{path} exists and was not written by a conversion; move it out of {self.dst}, or pass --force "
                    "to replace it"
                )
            self.overwritten += 1
        self._journal.write(rel + "\n")
        self._journal.flush()
        self.written.add(rel)

    def drop(self, path: Path) -> None:
        """Forget ``path`` (removed as stale)."""
        self.owned.discard(self.rel(path))

    def finish(self) -> None:
        """Write the final manifest (earlier files still there plus this run's) and remove the journal."""
        files = {f for f in self.owned if (self.dst / f).exists() or (self.dst / f).is_symlink()} | self.written
        self._write_manifest(sorted(files))
        self.close()
        (self.dst / JOURNAL).unlink(missing_ok=True)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _write_manifest(self, files: list) -> None:
        """Deterministic bytes, rewritten only when they change (so reruns keep its modification time)."""
        data = {"format": FORMAT, "kind": self.kind, "so_det_ultra": _version.__version__, "options": self.options}
        data["files"] = files
        _io.atomic_write_text(self.dst / MANIFEST, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _read_journal(dst: Path) -> set:
    try:
        return {line for line in (dst / JOURNAL).read_text(encoding="utf-8").splitlines() if line}
    except FileNotFoundError:
        return set()
