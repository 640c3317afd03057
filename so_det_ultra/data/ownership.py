"""What a run may touch in its output folder: the one ownership model of every so-det-ultra command that writes one.

Converters (``so-det convert``), ``so-det synthetic``, ``so-det predict`` save folders and ``so-det export --sparse``
folders all go through this module; ``merge-predictions`` writes its one file with the same primitives
(:mod:`._io`). The rules, in docs/datasets.md ("Ownership, locking and overwriting"):

- **Links** (:func:`~._io.check_inside`): nothing is written, deleted or unpacked through a symbolic link below the
  output folder, and no bookkeeping file may be a link; temporary files are created exclusively, never through a
  link, under unpredictable names; work folders (archives unpacked) get fresh names of the run's own.
- **Lock** (:func:`dst_lock`): one run at a time per output folder, through an OS-level lock on
  ``DST/.so-det.lock`` (the ``filelock`` package: ``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows, released by
  the OS when the process dies). The holder writes its PID to ``DST/.so-det.lock.pid``; a second run says which PID
  it waits for, or gives up after ``lock_timeout`` seconds with "DST is being written by PID N".
- **Manifest** (:class:`Ownership`): ``DST/.so-det-manifest.json`` lists every file runs of one kind wrote there
  (relative paths), with the kind (``visdrone``, ``soda-d``, ``synthetic``, ``predict``, ``sparse-export``), the
  so-det-ultra version and the options. A run deletes as stale only files listed there, and writes over a file only
  when a run of its kind wrote it; a file of the user's is replaced only with ``force``, and nothing is deleted that
  the manifest does not list. Before a run writes a file it appends the path to ``DST/.so-det-manifest.journal``, so
  that files of a run killed half-way are still known as the run's own; the journal is folded into the manifest at
  the end of the run.
- **All or nothing** (:meth:`Ownership.transaction`): a file that replaces an existing one is written under a
  temporary name and moved into place only when the transaction ends (a conversion, one input of a prediction job,
  an export); if the transaction fails, the new files it created are removed and the replaced ones are untouched,
  and an OS error (a full disk) says so, naming the file.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

from so_det_ultra import _version
from so_det_ultra.data import _io
from so_det_ultra.data._io import DestinationError

MANIFEST = ".so-det-manifest.json"
JOURNAL = ".so-det-manifest.journal"
LOCK = ".so-det.lock"
LOCK_PID = ".so-det.lock.pid"
BOOKKEEPING = (MANIFEST, JOURNAL, LOCK, LOCK_PID)  # never user content, never listed in the manifest
FORMAT = 1
WRITERS = {"visdrone": "a conversion", "soda-d": "a conversion"}  # who writes a kind's files, for messages


def _who(kind: str) -> str:
    return WRITERS.get(kind, f"so-det {kind}")


def _what(kind: str) -> str:
    return "conversion" if kind in WRITERS else "output"


__all__ = [
    "DestinationError",
    "Ownership",
    "check_paths",
    "dst_lock",
    "read_manifest",
    "check_lock_timeout",
    "only_bookkeeping",
]


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


def check_lock_timeout(timeout) -> float | None:
    """``timeout`` (seconds) when it is None or a finite number >= 0; :class:`DestinationError` otherwise."""
    if timeout is None:
        return None
    try:
        ok = math.isfinite(float(timeout)) and float(timeout) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DestinationError(
            f"--lock-timeout must be a finite number of seconds >= 0, got {timeout!r}; leave it out to wait until "
            "the other run ends"
        )
    return float(timeout)


def only_bookkeeping(dst: Path) -> bool:
    """True when ``dst`` is a real folder holding nothing but bookkeeping files (a run that failed before its first
    output left them): a retry may write there without ``--force``."""
    dst = Path(dst)
    if dst.is_symlink() or not dst.is_dir():
        return False
    return all(p.name in BOOKKEEPING and not p.is_symlink() and p.is_file() for p in dst.iterdir())


def check_folder(dst: Path) -> None:
    """Refuse a ``dst`` that is a file, and bookkeeping files in it that are links (never written through)."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst} is a file, not a folder; give a folder to write into")
    for name in BOOKKEEPING:
        if (dst / name).is_symlink():
            raise DestinationError(
                f"{dst / name} is a symbolic link; so-det-ultra does not write its bookkeeping through links: remove it"
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

    timeout = check_lock_timeout(timeout)
    dst = Path(dst)
    check_folder(dst)
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
                f"{dst} is being written by PID {_read_pid(dst)}; wait for it to finish, or write elsewhere"
            ) from None
    try:
        check_folder(dst)  # again under the lock
        _io.atomic_write_text(dst / LOCK_PID, f"{os.getpid()}\n")
        yield
    finally:
        if not (dst / LOCK_PID).is_symlink():
            (dst / LOCK_PID).unlink(missing_ok=True)
        lock.release()


def _waiting(timeout):
    return "" if timeout is None else f" (at most {timeout:g} s)"


def read_manifest(dst: Path) -> dict | None:
    """The manifest in ``dst``, or None when there is none; a damaged one is a :class:`DestinationError`."""
    path = Path(dst) / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if path.is_symlink():
            raise ValueError("a symbolic link")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("files"), list) or "kind" not in data:
            raise ValueError("not a so-det-ultra manifest")
        if not all(isinstance(f, str) for f in data["files"]):
            raise ValueError("its file list holds entries that are not paths")
    except (OSError, ValueError) as err:
        raise DestinationError(
            f"{path} is unreadable ({err}); remove it to treat {dst} as a folder without a manifest (then --force)"
        ) from None
    return data


def foreign_entries(dst: Path, spare=()) -> list[str]:
    """Names directly in ``dst`` other than bookkeeping, temporary files and (ancestors of) the real folders in
    ``spare`` (the source kept in DST); a link is never spared."""
    if not dst.is_dir():
        return []
    keep = set()
    for folder in spare:
        f = Path(folder).resolve()
        keep |= {
            p.name
            for p in dst.resolve().iterdir()
            if not p.is_symlink() and (p.resolve() == f or p.resolve() in f.parents)
        }
    ours = set(BOOKKEEPING) | keep
    return sorted(p.name for p in dst.iterdir() if p.name not in ours and not _io.TEMP_RE.match(p.name))


class Ownership:
    """The files runs of one kind own in ``dst``: :meth:`start` it under :func:`dst_lock`, write through it inside
    :meth:`transaction`, then :meth:`finish`.

    Writing: :meth:`write_bytes`, :meth:`write_text`, :meth:`place` (an image copied or linked) and
    :meth:`temp_for` + :meth:`install` (a writer that needs a file name, e.g. a video or an ONNX graph) each
    :meth:`claim` the path first.
    """

    def __init__(self, dst: Path, kind: str, options: dict, owned: set, force: bool):
        self.dst, self.kind, self.options, self.force = Path(dst), kind, options, force
        self.owned = set(owned)  # relative POSIX paths written by earlier runs of this kind (manifest + journal)
        self.written: set = set()  # relative paths this run wrote
        self.overwritten = 0  # files this run replaced that no run had written (only with force)
        self.temp_removed = 0  # temporary files of dead runs removed by start()
        self._journal = None
        self._staged: list = []  # (temporary file, path) pairs moved into place when the transaction ends
        self._temps: set = set()  # temporary files handed out by temp_for() and not installed yet
        self._created: list = []  # paths created (nothing was there) in the open transaction
        self._doomed: list = []  # stale paths deleted when the run finishes
        self._finished = False

    @staticmethod
    def check(dst: Path, kind: str, force: bool = False, spare=(), empty: bool = True) -> tuple[dict | None, set]:
        """``(earlier manifest, files owned)`` when ``dst`` may be written; :class:`DestinationError` otherwise.

        ``empty``: a non-empty folder without a manifest is refused unless ``force`` (converters, exports,
        synthetic); ``so-det predict`` passes False and checks each file it writes instead. Read-only: run once
        before taking the lock (so a refused folder gets no lock file) and again under it.
        """
        dst = Path(dst)
        check_folder(dst)
        prev = read_manifest(dst)
        if prev is None:
            there = foreign_entries(dst, spare) if empty else []
            if there and not force:
                shown = ", ".join(there[:5]) + (f" and {len(there) - 5} more" if len(there) > 5 else "")
                raise DestinationError(
                    f"{dst} is not empty ({shown}) and holds no {_who(kind).split()[-1]} manifest ({MANIFEST}); "
                    "choose an empty or new folder, or pass --force to write into it anyway (files it does not write "
                    "are kept, same-named ones replaced)"
                )
            return prev, set()
        if prev["kind"] != kind:
            if not force:
                raise DestinationError(
                    f"{dst} holds a {prev['kind']} {_what(prev['kind'])}; write the {kind} output into another "
                    f"folder, or pass --force (the {prev['kind']} files are then kept but no longer managed)"
                )
            return prev, set()
        return prev, {str(f) for f in prev["files"]} | _read_journal(dst)

    @classmethod
    def start(cls, dst: Path, kind: str, options: dict, force: bool = False, spare=(), empty: bool = True):
        """Check ``dst`` may be written, remove dead runs' temporary files, record that a run started (manifest,
        empty journal) and return the owner."""
        dst = Path(dst)
        prev, owned = cls.check(dst, kind, force, spare, empty)
        owner = cls(dst, kind, options, owned, force)
        owner.temp_removed = owner._sweep()
        if prev is None or prev["kind"] != kind:
            owner._write_manifest([])  # first: a run killed from here on leaves a folder recognised as ours
        elif owned != {str(f) for f in prev["files"]}:
            owner._write_manifest(sorted(owned))  # a killed run's journal, kept before the journal starts afresh
        fd = os.open(dst / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _io._NOFOLLOW, 0o666)
        owner._journal = os.fdopen(fd, "w", encoding="utf-8")
        return owner

    def _sweep(self) -> int:
        """Remove temporary files of dead runs in ``dst`` and in the folders of the files it owns."""
        folders = {self.dst} | {(self.dst / f).parent for f in self.owned}
        n = 0
        for folder in sorted(folders):
            try:
                _io.check_inside(folder / "x", self.dst)
            except DestinationError:
                continue  # a link: never followed (a write there is refused where it happens)
            n += _io.remove_temp(folder)
        return n

    # ------------------------------------------------------------------------------------------------ the rules

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.dst).as_posix()

    def is_owned(self, path: Path) -> bool:
        return self.rel(path) in self.owned

    def is_user_file(self, path: Path) -> bool:
        """True when ``path`` exists (or is a link) and no run of this kind wrote it."""
        path = Path(path)
        return self.rel(path) not in self.owned | self.written and (path.exists() or path.is_symlink())

    def check_claim(self, path: Path) -> None:
        """Refuse, before anything is written, a path through a link or a file of the user's (unless forced)."""
        _io.check_inside(path, self.dst)
        if self.is_user_file(path) and not self.force:
            raise DestinationError(
                f"{path} exists and was not written by {_who(self.kind)}; move it out of {self.dst}, or pass "
                "--force to replace it"
            )

    def claim(self, path: Path) -> None:
        """Record ``path`` as this run's before it is written (:meth:`check_claim` first)."""
        rel = self.rel(path)
        if rel in self.written:
            _io.check_inside(path, self.dst)
            return
        self.check_claim(path)
        if self.is_user_file(path):
            self.overwritten += 1
        self._journal.write(rel + "\n")
        self._journal.flush()
        self.written.add(rel)

    # ---------------------------------------------------------------------------------------------------- writes

    def write_bytes(self, path: Path, data: bytes) -> bool:
        """Write ``data`` to ``path`` (claimed) unless it already holds exactly these bytes; True if written."""
        path = Path(path)
        self.claim(path)
        if _io.same_bytes(path, data):
            return False
        self.install(_io.write_temp(path, data), path)
        return True

    def write_text(self, path: Path, text: str) -> bool:
        """:meth:`write_bytes` for UTF-8 text."""
        return self.write_bytes(path, text.encode("utf-8"))

    def place(self, path: Path, src: Path, mode: str = "copy") -> bool:
        """Put ``src`` at ``path`` (claimed) by ``mode`` (:data:`~._io.IMAGE_MODES`) unless already there."""
        path = Path(path)
        self.claim(path)
        if _io.same_placement(src, path, mode):
            return False
        self.install(_io.place_temp(src, path, mode), path)
        return True

    def temp_for(self, path: Path, keep_suffix: bool = True) -> Path:
        """A new empty temporary file next to ``path`` (claimed) for a writer that opens files by name; hand it to
        :meth:`install` when complete, or :meth:`discard` it."""
        path = Path(path)
        self.claim(path)
        fd, tmp = _io.create_temp(path, keep_suffix)
        os.close(fd)
        self._temps.add(tmp)
        return tmp

    def adopt(self, tmp: Path) -> Path:
        """Count ``tmp``, a temporary file a writer makes beside one of :meth:`temp_for` (e.g. OpenVINO's ``.bin``
        beside its ``.xml``), as this transaction's: removed if it fails."""
        self._temps.add(Path(tmp))
        return Path(tmp)

    def install(self, tmp: Path, path: Path) -> None:
        """Move the complete temporary file ``tmp`` to ``path``: now when nothing is there, else when the
        transaction ends (the file it replaces stays whole until then)."""
        _io.check_inside(path, self.dst)
        self._temps.discard(tmp)
        if path.exists() or path.is_symlink():
            self._staged.append((tmp, path))
            return
        os.replace(tmp, path)
        self._created.append(path)

    def mkdir(self, folder: Path) -> Path:
        """Create ``folder`` (and its parents) inside ``dst``, never through a link."""
        _io.check_inside(Path(folder) / "x", self.dst)
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)

    def discard(self, tmp: Path) -> None:
        """Remove a temporary file of :meth:`temp_for` that will not be installed."""
        self._temps.discard(tmp)
        Path(tmp).unlink(missing_ok=True)

    def remove_stale(self, folder: Path, keep: set) -> list[Path]:
        """The files of ``folder`` that runs of this kind wrote and this run did not keep (``keep``: names); they are
        deleted when the run finishes."""
        _io.check_inside(Path(folder) / "x", self.dst)
        stale = _io.stale_files(folder, keep, self.is_owned)
        self._doomed += stale
        return stale

    # ------------------------------------------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self, kept: str):
        """All or nothing: on a clean exit :meth:`commit`; on an error :meth:`rollback` and re-raise, an OS error with
        ``kept`` (what is intact, e.g. "the earlier conversion in DST is intact") added to its message."""
        try:
            yield self
        except BaseException as err:
            if not self._finished:
                self.rollback()
            if isinstance(err, OSError) and err.errno is not None:
                raise OSError(err.errno, f"{_io.os_error_text(err).split('] ', 1)[-1]}; {kept}") from err
            raise
        if not self._finished:
            self.commit()

    def commit(self) -> None:
        """Move the staged files into place."""
        staged, self._staged, self._created = self._staged, [], []
        for tmp, path in staged:
            os.replace(tmp, path)

    def rollback(self) -> None:
        """Remove the staged and handed-out temporary files and the files the open transaction created."""
        for tmp in [t for t, _ in self._staged] + sorted(self._temps):
            tmp.unlink(missing_ok=True)
        self._temps = set()
        for path in self._created:
            path.unlink(missing_ok=True)
            self.written.discard(self.rel(path))
        self._staged, self._created = [], []

    def finish(self) -> None:
        """Commit, delete the stale files, write the final manifest (earlier files still there plus this run's) and
        remove the journal."""
        self.commit()
        for path in self._doomed:
            path.unlink(missing_ok=True)
            self.owned.discard(self.rel(path))
        self._doomed = []
        files = {f for f in self.owned if (self.dst / f).exists() or (self.dst / f).is_symlink()} | self.written
        self._write_manifest(sorted(files))
        self.close()
        (self.dst / JOURNAL).unlink(missing_ok=True)
        self._finished = True

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
    path = Path(dst) / JOURNAL
    if path.is_symlink():
        return set()
    try:
        return {line for line in path.read_text(encoding="utf-8").splitlines() if line}
    except FileNotFoundError:
        return set()
