"""Bookkeeping of a conversion run: what was written, what was skipped and why, formatted as an end summary.

The converters return the :class:`Summary`, write it to their log file and hand it to Ultralytics' ``LOGGER``; they
never print. Object sizes are counted in the COCO bins of :mod:`so_det_ultra.data.contract`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from so_det_ultra.data.contract import COCO_BINS, size_bin


@dataclass
class Summary:
    """Counts of one conversion run; ``problems`` holds one ``file:line: reason`` string per bad input line."""

    names: dict = field(default_factory=dict)
    images: Counter = field(default_factory=Counter)  # split -> images (or tiles) written
    source_images: Counter = field(default_factory=Counter)  # split -> source images read
    objects: Counter = field(default_factory=Counter)  # class id -> objects written
    scales: Counter = field(default_factory=Counter)  # small / medium / large
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (or annotations) not written as objects
    ignore_regions: int = 0
    clipped: int = 0
    files_written: int = 0
    stale_removed: int = 0
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # "file: note" for input that converts but deserves a look
    temp_removed: int = 0  # temporary files of an interrupted earlier run, removed
    overwritten: int = 0  # files no conversion had written, replaced by a forced run (same names)

    def add_object(self, cls: int, w: float, h: float) -> None:
        self.objects[cls] += 1
        self.scales[size_bin(w * h, COCO_BINS)] += 1

    def problem(self, where: str, reason: str) -> None:
        """A malformed input line/record: reported as ``where: reason`` and counted under ``malformed: reason``."""
        self.problems.append(f"{where}: {reason}")
        self.skipped[f"malformed: {reason}"] += 1

    def warn(self, where: str, note: str) -> None:
        """Input that still converts but deserves a look (e.g. an empty annotation file): reported, not skipped."""
        self.warnings.append(f"{where}: {note}")

    def format(self, max_problems: int = 20) -> str:
        lines = []
        if self.warnings:
            lines.append(f"{len(self.warnings)} warning(s) (converted anyway):")
            lines += [f"  {w}" for w in self.warnings[:max_problems]]
            if len(self.warnings) > max_problems:
                lines.append(f"  ... {len(self.warnings) - max_problems} more (all listed in the conversion log)")
        if self.problems:
            lines.append(f"{len(self.problems)} malformed line(s) or record(s):")
            lines += [f"  {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... {len(self.problems) - max_problems} more (all listed in the conversion log)")
        splits = ", ".join(f"{s} {n}" for s, n in self.images.items()) or "none"
        src = ", ".join(f"{s} {n}" for s, n in self.source_images.items()) or "none"
        lines.append(f"images written: {splits} (from source images: {src})")
        total = sum(self.objects.values())
        lines.append(f"objects written: {total}")
        for c in sorted(set(self.names) | set(self.objects)):
            lines.append(f"  {c:>2} {self.names.get(c, '?'):<16} {self.objects[c]}")
        lines.append(
            "  scale: "
            + ", ".join(f"{k} {self.scales[k]}" for k, *_ in COCO_BINS)
            + " (COCO bins, area <= 32^2 / <= 96^2 / larger)"
        )
        lines.append(
            f"boxes clipped to the image/tile: {self.clipped}; ignored regions in sidecars: {self.ignore_regions}"
        )
        lines.append("rows not written as objects:" + ("" if self.skipped else " none"))
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        lines.append(f"files changed: {self.files_written}; stale files removed: {self.stale_removed}")
        if self.temp_removed:
            lines.append(f"temporary files of an interrupted run removed: {self.temp_removed}")
        if self.overwritten:
            lines.append(
                f"--force: existing files replaced by same-named output: {self.overwritten} (nothing else touched)"
            )
        return "\n".join(lines)
