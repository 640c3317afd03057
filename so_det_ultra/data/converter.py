"""The converter skeleton that the VisDrone (:mod:`.visdrone`) and SODA-D (:mod:`.soda`) converters fill in.

A converter subclasses :class:`Converter`, sets its class attributes (dataset name, class names, ``so_det:`` key,
environment variable, "not found" message) and writes three methods: :meth:`~Converter.find` (sources in an unpacked
folder), :meth:`~Converter.archives` (official archives in a folder) and :meth:`~Converter.convert_split` (one
source split into a :class:`SplitWriter`). The skeleton keeps the guarantees every converter gives:

- the source is never modified: the output may not be, or lie inside, a source folder, nor hold one in the folders
  it rewrites (:func:`check_dst`), and nothing is written through a link below DST; archives are unpacked into a
  work folder of the run's own (``<dst>/.extract.<pid>-<random>.tmp``), removed afterwards;
- bad input lines are reported as ``file:line: reason`` and counted in the :class:`~._summary.Summary`;
- the user's files are never deleted or overwritten: the output folder is locked for the run, and only files listed
  in its manifest (written by an earlier conversion of the same kind) are replaced or removed as stale; a non-empty
  folder without a manifest is refused unless ``force`` (:mod:`.ownership`);
- reruns are safe: every output is written atomically and only when its bytes change, and files of the converted
  splits' ``images/``, ``labels/`` and ``sidecars/`` folders that an earlier run wrote and this run did not are
  removed; a run is one transaction (:meth:`~.ownership.Ownership.transaction`): files it changes replace the old
  ones only when it completes, so a run that fails (a full disk) leaves the earlier conversion as it was; a run
  killed at any point leaves only complete files plus temporary ones, which the next run removes first, so the
  rerun's tree is byte-identical to an uninterrupted run's (tested with ``SO_DET_FAULT_KILL_AFTER``, :mod:`._io`);
- a split whose annotation file cannot be used at all (e.g. an empty or unreadable SODA-D JSON) raises
  :class:`UnusableSource` in :meth:`~Converter.convert_split`: it is reported by file, its output folders are left
  as they are, and the other splits convert;
- the end summary goes to ``<dst>/convert-<name>.log`` and to Ultralytics' ``LOGGER``; the Summary is returned.

Layout and sidecar schema: :mod:`so_det_ultra.data.contract`.
"""

from __future__ import annotations

import math
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from so_det_ultra.data import _io, contract
from so_det_ultra.data._summary import Summary
from so_det_ultra.data.ownership import Ownership, check_lock_timeout, check_paths, dst_lock

EXTRACT_DIR = "extract"  # archives are unpacked into <dst>/.extract.<pid>-<random>.tmp for the run, then removed
GREY = 114  # Ultralytics' letterbox padding value, used to mask ignored regions (as ESOD does)


def check_dst(src, dst) -> None:
    """Refuse output touching the source: ``dst`` equal to or inside ``src``, or ``src`` inside an output folder.

    ``src`` is one source folder (or annotation file); ``dst`` may contain it (e.g. the official folders unzipped into
    the dataset root), as long as it is not under one of the folders the converter rewrites
    (:data:`~so_det_ultra.data.contract.OUTPUT_DIRS`).
    """
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s or s in d.parents:
        raise ValueError(f"output folder {d} must not be the source folder {s} or inside it: the source is read-only")
    for owned in contract.OUTPUT_DIRS:
        if (d / owned) == s or (d / owned) in s.parents:
            raise ValueError(f"source {s} lies inside the output folder {d / owned}, which the converter rewrites")


def fill_ignored(img, ann: contract.Annotation, grey: int = GREY, keep=(), truncate: bool = False):
    """Fill ``ann``'s ignored regions of ``img`` (HxWxC array, changed in place) with ``grey``, then restore the pixels
    of ``ann``'s objects and of the extra ``keep`` boxes (``[x1, y1, x2, y2]``).

    A box covers rows ``int(y1):ceil(y2)`` and columns ``int(x1):ceil(x2)`` (every pixel it touches); with
    ``truncate``, ``int(y1):int(y2)`` and ``int(x1):int(x2)``, as SODA-D's official split builds its mask
    (github shaunyuan22/SODA-mmdetection, ``tools/img_split/sodad_split.py``, ``_getIgnMask``, lines 330-341).
    """
    import numpy as np

    end = int if truncate else math.ceil
    mask = np.zeros(img.shape[:2], bool)
    for x1, y1, x2, y2 in ann.ignore:
        mask[int(y1) : end(y2), int(x1) : end(x2)] = True
    for x1, y1, x2, y2 in [o.box for o in ann.objects] + [list(k) for k in keep]:
        mask[int(y1) : end(y2), int(x1) : end(x2)] = False
    img[mask] = grey
    return img


class UnusableSource(ValueError):
    """A split's annotation file cannot be used at all (empty, unreadable, wrong format): the split is skipped."""


@dataclass(frozen=True)
class Source:
    """One split of the source dataset, as a converter found it.

    Attributes:
        split: Split name in the output (``train``, ``val``, ``test``).
        images: Folder holding the split's images.
        annotations: The split's annotation folder (VisDrone) or file (SODA-D JSON).
        guard: Folders the output must not touch (:func:`check_dst`).
        extracted: True when unpacked from an archive into the temporary folder (hardlinks to it are then safe).
    """

    split: str
    images: Path
    annotations: Path
    guard: tuple = ()
    extracted: bool = False


@dataclass
class SplitWriter:
    """Writes one split of the output (image, label, sidecar per image or tile) and removes its stale files.

    Use as a context manager: on a clean exit, files of the split's folders that an earlier conversion wrote
    (``owner``'s manifest) and this run did not are removed when the run finishes; other files are left alone.
    """

    dst: Path
    split: str
    summary: Summary
    owner: Ownership
    keep: dict = field(default_factory=lambda: {d: set() for d in contract.OUTPUT_DIRS})

    def write(
        self,
        name: str,
        width: int,
        height: int,
        ann: contract.Annotation,
        *,
        image_bytes=None,
        image_src=None,
        mode: str = "copy",
        tile: contract.TileOrigin | None = None,
    ) -> None:
        """Write image ``name`` (``image_bytes``, or placed from ``image_src`` by ``mode``), its label and sidecar.

        Objects are counted in the summary here, so tiles count every object they hold.
        """
        stem = Path(name).stem
        img = contract.split_dir(self.dst, contract.IMAGES, self.split) / name
        lbl = contract.split_dir(self.dst, contract.LABELS, self.split) / f"{stem}.txt"
        side = contract.split_dir(self.dst, contract.SIDECARS, self.split) / f"{stem}.json"
        for path in (img, lbl, side):
            self.owner.check_claim(path)
        if image_bytes is not None:
            changed = self.owner.write_bytes(img, image_bytes)
        else:
            changed = self.owner.place(img, image_src, mode)
        changed += self.owner.write_text(lbl, contract.yolo_rows(ann.objects, width, height))
        changed += contract.write_sidecar(side, name, width, height, ann, tile, write=self.owner.write_text)
        for o in ann.objects:
            self.summary.add_object(o.cls, o.x2 - o.x1, o.y2 - o.y1)
        self.summary.files_written += changed
        self.summary.images[self.split] += 1
        for kind, path in ((contract.IMAGES, img), (contract.LABELS, lbl), (contract.SIDECARS, side)):
            self.keep[kind].add(path.name)

    def write_sidecar(self, name: str, width: int, height: int, ann: contract.Annotation) -> None:
        """A sidecar of its own (no image, no label), e.g. a full image's beside its tiles'."""
        path = contract.split_dir(self.dst, contract.SIDECARS, self.split) / f"{Path(name).stem}.json"
        self.summary.files_written += contract.write_sidecar(
            path, name, width, height, ann, write=self.owner.write_text
        )
        self.keep[contract.SIDECARS].add(path.name)

    def close(self) -> None:
        """Mark the files of this split's folders that an earlier conversion wrote and this run did not as stale
        (removed when the run finishes)."""
        for kind, names in self.keep.items():
            stale = self.owner.remove_stale(contract.split_dir(self.dst, kind, self.split), names)
            self.summary.stale_removed += len(stale)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()


class Converter(ABC):
    """Skeleton of an official-annotations -> YOLO + sidecars converter (see the module docstring).

    Attributes:
        name: Dataset name: progress labels and the log file ``convert-<name>.log``.
        names: Class names ``{index: name}`` (a converter may replace them from the source, e.g. SODA-D's JSON).
        so_det: The data YAML's ``so_det:`` key (:func:`~so_det_ultra.data.contract.so_det_key`).
        env: Environment variable naming a folder with the source files (for the YAML's ``download:`` step).
        missing: "Not found" message, formatted with ``where`` and ``env``.
    """

    name: str
    names: dict
    so_det: dict
    env: str
    missing: str

    def __init__(self, images: str, mask_ignored: bool, show_progress: bool):
        if images not in _io.IMAGE_MODES:
            raise ValueError(f"image mode must be one of {_io.IMAGE_MODES}, got {images!r}")
        self.images, self.mask_ignored, self.show_progress = images, mask_ignored, show_progress

    @classmethod
    @abstractmethod
    def find(cls, src: Path) -> list[Source]:
        """The sources in an unpacked folder ``src`` (empty if none)."""

    @classmethod
    @abstractmethod
    def archives(cls, src: Path) -> list[Path]:
        """The official archives at ``src`` (a folder, or an archive itself)."""

    @abstractmethod
    def locate(self, src: Path, extract: Path) -> list[Source]:
        """The sources to convert, unpacking archives into ``extract`` (with :meth:`unpack`) where needed."""

    @abstractmethod
    def convert_split(self, source: Source, out: SplitWriter) -> dict | None:
        """Convert ``source`` through ``out``; return the class names read from the source, or None."""

    def image_mode(self, source: Source) -> str:
        """How unmodified images reach the output: files unpacked for this run are hardlinked, whether ``copy`` or
        ``symlink`` was asked (a link into the work folder, which is removed after the run, would dangle)."""
        return "hardlink" if source.extracted else self.images

    def unpack(self, archive: Path, extract: Path) -> Path:
        from ultralytics.utils import LOGGER

        LOGGER.info(f"extracting {archive} ...")
        return _io.extract_archive(archive, extract)

    def options(self) -> dict:
        """The converter's settings as recorded in the manifest (plain values only)."""
        plain = (str, int, float, bool, type(None))
        out = {}
        for k, v in sorted(vars(self).items()):
            v = list(v) if isinstance(v, tuple) else v
            if k != "show_progress" and all(isinstance(x, plain) for x in (v if isinstance(v, list) else [v])):
                out[k] = v
        return out

    def run(self, src, dst, verbose: bool = True, force: bool = False, lock_timeout=None, guard_src: bool = True):
        """Convert ``src`` into ``dst``: sources, splits, ``data.yaml``, log, manifest. Returns the run's summary.

        ``force`` converts into a non-empty folder without a manifest (nothing but same-named files is replaced);
        ``lock_timeout`` (seconds) gives up waiting for another run writing ``dst``; ``guard_src=False`` lets ``src``
        contain ``dst`` or lie in it (the data YAMLs' ``download:`` step, where the official files sit in the dataset
        folder or its parent; the folders actually read are still guarded).
        """
        src_arg, dst_arg = src, dst
        if not str(dst_arg).strip():
            check_paths(src_arg, dst_arg)
        src, dst = Path(src), Path(dst)
        if not src.exists():
            raise FileNotFoundError(self.missing.format(where=src, env=self.env))
        if guard_src:
            check_paths(src, dst)
        summary = Summary(names=dict(self.names))
        spare = [src, *(g for s in self.find(src) for g in s.guard), *self.archives(src)]  # sources kept in DST
        check_lock_timeout(lock_timeout)
        Ownership.check(dst, self.name, force, spare)  # refuse before the lock file is created
        with dst_lock(dst, lock_timeout):
            owner = Ownership.start(dst, self.name, self.options(), force, spare)
            summary.temp_removed = owner.temp_removed
            try:
                with owner.transaction(f"nothing of this run was kept: {dst} holds what it held before"):
                    self._convert(src, dst, owner, summary)
                    self.finish(dst, summary, verbose, owner)
                    owner.finish()
            finally:
                owner.close()
        return summary

    def _convert(self, src: Path, dst: Path, owner: Ownership, summary: Summary) -> None:
        names, extract = None, _io.work_dir(dst, EXTRACT_DIR)
        try:
            sources = self.locate(src, extract)
            if not sources:
                raise FileNotFoundError(self.missing.format(where=src, env=self.env))
            if self.images == "symlink" and any(s.extracted for s in sources):
                from ultralytics.utils import LOGGER

                LOGGER.warning(
                    f"--images symlink: images unpacked from archives are hardlinked into {dst} instead (their "
                    "unpacked copies are removed after the run); unzip the archives yourself to link to them"
                )
            for source in sources:
                for folder in source.guard:
                    check_dst(folder, dst)
            for source in sources:
                try:
                    with SplitWriter(dst, source.split, summary, owner) as out:
                        got = self.convert_split(source, out)
                except UnusableSource as err:
                    summary.problem(str(source.annotations), f"{err}; split {source.split!r} skipped")
                    continue
                if got is not None and names is not None and got != names:
                    raise ValueError(f"{source.annotations}: categories {got} differ from the other splits' {names}")
                names = got if got is not None else names
        finally:
            if extract.is_dir() and not extract.is_symlink():
                shutil.rmtree(extract)
        if names is not None:
            summary.names = names

    def finish(self, dst: Path, summary: Summary, verbose: bool, owner: Ownership) -> None:
        """Write ``data.yaml`` and the log; hand the summary to Ultralytics' ``LOGGER`` when ``verbose``.

        When no image was converted at all, the log is written and the run stops with the reasons (the problems).
        """
        from ultralytics.utils import LOGGER

        log = dst / f"convert-{self.name}.log"
        summary.overwritten = owner.overwritten
        owner.check_claim(log)
        if not sum(summary.images.values()):
            owner.write_text(log, summary.format(max_problems=len(summary.problems)) + "\n")
            owner.finish()  # the log of a run that converted nothing is kept: it lists the reasons
            more = len(summary.problems) - 3
            why = "; ".join(summary.problems[:3]) + (f" (and {more} more)" if more > 0 else "")
            raise FileNotFoundError(f"nothing converted into {dst}" + (f": {why}" if why else "") + f"; see {log}")
        contract.write_data_yaml(dst, summary.names, self.so_det, write=owner.write_text)
        if not contract.split_dir(dst, contract.IMAGES, "val").is_dir():
            LOGGER.warning(f"no val split in {dst}; data.yaml uses train as val (convert the val split to fix)")
        owner.claim(log)
        summary.overwritten = owner.overwritten
        owner.write_text(log, summary.format(max_problems=len(summary.problems)) + "\n")
        if verbose:
            LOGGER.info(summary.format())

    @classmethod
    def found(cls, folder: Path) -> bool:
        """True when ``folder`` holds the dataset, unpacked or as archives."""
        return bool(cls.find(folder) or cls.archives(folder))

    @classmethod
    def local_source(cls, data: dict) -> Path:
        """For a data YAML's offline ``download:`` step: the folder holding the source (``$env``, ``path``, parent)."""
        return _io.find_local_source(data, cls.env, cls.found, cls.missing)
