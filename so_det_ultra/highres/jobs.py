"""Prediction jobs that outgrow one run or one machine: shards, resume, one result file per input, merging.

A save folder of ``so-det predict`` holds:

- ``job.json``: what produced the folder (model, mode, predictor options, ``--vid-stride``, tracker, shard) and the
  shard's inputs with their position in the whole, sorted input list;
- ``results/<name>.json``: one record per finished input (its COCO rows, its frame count, the files it wrote),
  written atomically and last, after the input's other outputs; an input with a record is done;
- ``predictions.json`` (``--save-json``): the records' rows in input order, rebuilt from the records at the end of
  every run, so a job killed at any point and rerun with ``--resume`` ends with the same file as an uninterrupted run.

``--shard K/N`` keeps inputs K-1, K-1+N, K-1+2N... of the sorted list (round robin: folders of large and small
files spread evenly); :func:`merge` joins the shards' records in that list's order, so merged shards give the same
``predictions.json`` as one run over everything.

Ownership (nothing a user wrote is overwritten): a run refuses, before predicting anything, to write any output over
one of its source files (``--force`` does not lift this), and to write into a folder holding a ``predictions.json``
or output files that another job (or no job) wrote, unless ``--force``.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from so_det_ultra.data._io import pid_alive
from so_det_ultra.highres.outputs import atomic_write_json, atomic_write_text

JOB_FILE, RESULTS, PREDICTIONS = "job.json", "results", "predictions.json"


class JobError(ValueError):
    """A job that would overwrite something it does not own, or shard folders that do not fit together."""


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; None stays None."""
    if text is None:
        return None
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/N (e.g. 3/8), got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def select_shard(items: list, shard: tuple[int, int] | None) -> list[tuple[int, object]]:
    """``(index in items, item)`` pairs of shard ``(K, N)`` (every item for None): items K-1, K-1+N, ..."""
    k, n = shard or (1, 1)
    return [(i, x) for i, x in enumerate(items) if i % n == k - 1]


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or not complete JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


class Job:
    """The state of one save folder: its ``job.json``, its records, its ``predictions.json``.

    Args:
        save_dir: The save folder.
        signature (dict): What decides the predictions (model, mode, options, ``vid_stride``, tracker, shard);
            JSON-serialisable. A folder whose ``job.json`` has another signature belongs to another job.
        items (list[tuple[int, Input]]): The run's inputs with their index in the whole sorted input list.
    """

    def __init__(self, save_dir, signature: dict, items: list):
        self.dir = Path(save_dir)
        self.signature = json.loads(json.dumps(signature))  # as it reads back from job.json
        self.items = items

    def record_path(self, inp) -> Path:
        return self.dir / RESULTS / f"{inp.name}.json"

    def record(self, inp) -> dict | None:
        """The input's record, or None when the input is not done (no record, or one of another input)."""
        rec = read_json(self.record_path(inp))
        return rec if isinstance(rec, dict) and rec.get("input") == inp.path else None

    def prepare(self, planned: dict, force: bool = False) -> list[str]:
        """Check ownership and write ``job.json``; returns notes for the user.

        Args:
            planned (dict[Input, list[Path]]): The files each input will write (annotated copy, labels, tracks).
            force (bool): Replace another job's results and overwrite files this folder's jobs did not write.

        Raises:
            JobError: An output would overwrite a source file, or the folder holds another job's files (no ``force``).
        """
        sources = {_resolved(inp.path) for inp in planned if inp.kind != "stream"}
        for paths in planned.values():
            for p in paths:
                if _resolved(p) in sources:
                    raise JobError(
                        f"--save-dir {self.dir}: the output {p.name} would overwrite the source file {p}; "
                        "choose a --save-dir outside the source folders"
                    )
        old = read_json(self.dir / JOB_FILE)
        ours = isinstance(old, dict) and old.get("signature") == self.signature
        notes = []
        if not ours and not force:
            self._refuse_foreign(old, planned)
        _sweep_temporaries([p for inp, paths in planned.items() for p in (*paths, self.record_path(inp))])
        if isinstance(old, dict) and not ours:  # another so-det job's records: ours to replace (--force)
            n = self._drop_records()
            notes += [f"--force: removed {n} result record(s) of another job from {self.dir / RESULTS}"] if n else []
        doc = {"signature": self.signature, "inputs": [[i, inp.path, inp.kind, inp.name] for i, inp in self.items]}
        atomic_write_json(self.dir / JOB_FILE, doc)
        return notes

    def _refuse_foreign(self, old, planned: dict) -> None:
        hint = "use another --save-dir, or --force to replace them"
        if isinstance(old, dict):
            was = old.get("signature", {})
            raise JobError(
                f"--save-dir {self.dir} holds the results of another job (model {was.get('model')}, mode "
                f"{was.get('mode')}, shard {was.get('shard')}; this job: model {self.signature.get('model')}, mode "
                f"{self.signature.get('mode')}, shard {self.signature.get('shard')}, or other options); {hint}"
            )
        if (self.dir / PREDICTIONS).exists():
            raise JobError(f"{self.dir / PREDICTIONS} exists and was not written by this job; {hint}")
        mine = [p for inp, paths in planned.items() for p in (*paths, self.record_path(inp))]
        clash = [p for p in mine if p.exists()]
        if clash:
            more = f" and {len(clash) - 1} more" if len(clash) > 1 else ""
            raise JobError(
                f"--save-dir {self.dir} already holds {clash[0].name}{more}, not written by so-det predict; "
                "use another --save-dir, or --force to overwrite"
            )

    def release(self) -> None:
        """Remove this job's ``job.json`` while no input of it is done (its model failed to load, say)."""
        old = read_json(self.dir / JOB_FILE)
        if isinstance(old, dict) and old.get("signature") == self.signature and not any(self._records()):
            (self.dir / JOB_FILE).unlink()

    def _records(self):
        return (self.dir / RESULTS).glob("*.json")

    def _drop_records(self) -> int:
        n = 0
        for f in self._records():
            f.unlink()
            n += 1
        return n

    def commit(self, inp, record: dict) -> None:
        """Write the input's record (last, after its other outputs): from now on the input is done."""
        atomic_write_json(self.record_path(inp), {"input": inp.path, "kind": inp.kind, **record})

    def assemble(self) -> tuple[Path, int]:
        """Write ``predictions.json`` from the records of this run's inputs, in input order; (path, rows)."""
        rows = []
        for _, inp in self.items:
            rows += (self.record(inp) or {}).get("rows", [])
        return write_predictions(self.dir / PREDICTIONS, rows), len(rows)


def write_predictions(path: Path, rows: list) -> Path:
    return atomic_write_text(path, json.dumps(rows))


def _sweep_temporaries(paths: list) -> None:
    """Remove the temporary files a killed run left next to ``paths`` (those of a live process stay)."""
    for path in paths:
        for tmp in Path(path).parent.glob(f".{glob.escape(Path(path).stem)}.*.tmp{Path(path).suffix}"):
            pid = tmp.name[len(Path(path).stem) + 2 :].split(".", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)


def _resolved(p) -> Path:
    return Path(p).expanduser().resolve()


def merge(out, shard_dirs, force: bool = False) -> tuple[Path, int, int]:
    """Join the records of shard save folders into one ``predictions.json`` at ``out``, in whole-list order.

    Returns:
        (Path, int, int): ``out``, the number of rows and of inputs.

    Raises:
        JobError: ``out`` exists (no ``force``); a folder is not a save folder; the shards were predicted with other
            settings, overlap, or miss inputs or shards (the last two pass with ``force``).
    """
    out = Path(out)
    if out.is_dir():
        raise JobError(f"OUT {out} is a folder; give the file to write, e.g. {out / PREDICTIONS}")
    if out.exists() and not force:
        raise JobError(f"{out} exists; use --force to overwrite it")
    first, seen, found, rows_of = None, {}, set(), {}
    for d in map(Path, shard_dirs):
        job = read_json(d / JOB_FILE)
        if not isinstance(job, dict) or "signature" not in job:
            raise JobError(f"{d} has no {JOB_FILE}: not a save folder of so-det predict")
        sig = dict(job["signature"])
        found.add(sig.pop("shard", None))
        if first is None:
            first = (d, sig)
        elif sig != first[1]:
            raise JobError(f"{d} was predicted with other settings than {first[0]} (model, mode or options differ)")
        missing = _collect(d, job, seen, rows_of)
        if missing and not force:
            raise JobError(
                f"{d}: {len(missing)} input(s) have no result yet (first: {missing[0]}); "
                "rerun that shard with --resume, or merge anyway with --force"
            )
    _check_shards(found, force)
    rows = [r for i in sorted(rows_of) for r in rows_of[i]]
    return write_predictions(out, rows), len(rows), len(rows_of)


def _collect(d: Path, job: dict, seen: dict, rows_of: dict) -> list[str]:
    """Add the records of save folder ``d`` to ``rows_of`` (index -> rows); returns the inputs without a record."""
    missing = []
    for index, path, _kind, name in job.get("inputs", []):
        if index in seen:
            other, was = seen[index]
            if was != path:
                raise JobError(f"{other} and {d} were not predicted from the same sources ({was} vs {path})")
            raise JobError(f"input {path} is in both {other} and {d}; give each shard's folder once")
        rec = read_json(d / RESULTS / f"{name}.json")
        if not isinstance(rec, dict) or rec.get("input") != path:
            missing.append(path)
            continue
        seen[index] = (d, path)
        rows_of[index] = rec.get("rows", [])
    return missing


def _check_shards(found: set, force: bool) -> None:
    shards = [parse_shard(s) for s in found if s is not None]
    if not shards:
        return
    n = {n for _, n in shards}
    if len(n) > 1:
        raise JobError(f"the folders hold shards of different splits (N = {sorted(n)})")
    lost = sorted(set(range(1, n.pop() + 1)) - {k for k, _ in shards})
    if lost and not force:
        raise JobError(f"shard(s) {', '.join(map(str, lost))} missing; add their folders, or merge anyway with --force")
