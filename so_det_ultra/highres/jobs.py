"""Prediction jobs that outgrow one run or one machine: shards, resume, one result file per input, merging.

A save folder of ``so-det predict`` holds:

- ``job.json``: what produced the folder (model and the content hash of its weights, mode, predictor options,
  ``--vid-stride``, tracker, shard) and the shard's inputs with their position in the whole, sorted input list;
- ``results/<name>.json``: one record per finished input (its job, its COCO rows, its frame count, the files it
  wrote), written last, after the input's other outputs; an input with a record of this job is done;
- ``predictions.json`` (``--save-json``): the records' rows in input order, rebuilt from the records at the end of
  every run, so a job killed at any point and rerun with ``--resume`` ends with the same file as an uninterrupted run;
- the manifest, journal and lock of every so-det-ultra output folder (:mod:`so_det_ultra.data.ownership`): the save
  folder is locked for the run, and a file is written over only when so-det predict wrote it (or with ``--force``).

``--shard K/N`` keeps inputs K-1, K-1+N, K-1+2N... of the sorted list (round robin: folders of large and small
files spread evenly); :func:`merge` joins the shards' records in that list's order, so merged shards give the same
``predictions.json`` as one run over everything.

Ownership (nothing a user wrote is overwritten): a run refuses, before loading the model, to write any output over
one of its source files (``--force`` does not lift this), into a folder holding another job's results, and over any
file so-det predict did not write, unless ``--force``; ``--force`` replaces only the files the new run writes and
the earlier job's records (listed in its ``job.json``), and only once the new model has loaded. ``--resume`` resumes
only the same job (the weights' content, not just their path) and refuses output options that would not apply to the
inputs done before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from so_det_ultra.data import _io
from so_det_ultra.data.ownership import BOOKKEEPING

JOB_FILE, RESULTS, PREDICTIONS = "job.json", "results", "predictions.json"
SIGNATURE_KEYS = ("model", "mode", "options")  # what every job.json signature holds


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
    """The JSON in ``path``, or None when it is missing, a link, or not complete JSON."""
    try:
        if Path(path).is_symlink():
            return None
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def job_problem(doc) -> str | None:
    """Why ``doc`` (a loaded ``job.json``) is not a so-det predict job file, or None when it is one."""
    if not isinstance(doc, dict):
        return f"it holds a JSON {type(doc).__name__}, not a job object"
    sig = doc.get("signature")
    if not isinstance(sig, dict) or not all(k in sig for k in SIGNATURE_KEYS):
        return "it has no job signature (model, mode, options)"
    rows = doc.get("inputs")
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and len(r) == 4 and isinstance(r[0], int) and all(isinstance(v, str) for v in r[1:])
        for r in rows
    ):
        return "its inputs are not [index, path, kind, name] rows"
    return None


def job_key(signature: dict) -> str:
    """A short hash of a job's signature: every record names the job that wrote it."""
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def weights_digest(model, known: dict | None = None) -> dict | None:
    """``{"sha256", "path", "size", "mtime_ns", "ctime_ns", "files"}`` of the model file (or of every file of a model
    folder, e.g. a sparse export), None for a model given by name.

    ``known`` (the entry of an earlier ``job.json``) is reused without rehashing when path, total size and the latest
    modification and status-change times still match: a file replaced in any way (even with its old modification
    time restored) changes its status-change time, and is hashed again.
    """
    path = Path(str(model))
    if not path.exists():
        return None
    files = sorted(
        p
        for p in (path.rglob("*") if path.is_dir() else [path])
        if p.is_file() and p.name not in BOOKKEEPING and not _io.TEMP_RE.match(p.name)
    )
    stats = [p.stat() for p in files]
    stamp = {
        "path": str(path.resolve()),
        "size": sum(st.st_size for st in stats),
        "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
        "ctime_ns": max((st.st_ctime_ns for st in stats), default=0),
        "files": len(files),
    }
    if (
        isinstance(known, dict)
        and isinstance(known.get("sha256"), str)
        and all(known.get(k) == v for k, v in stamp.items())
    ):
        return dict(known)
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() + b"\0" if path.is_dir() else b"")
        _hash_file(p, h)
    return {"sha256": h.hexdigest(), **stamp}


class Job:
    """The state of one save folder: its ``job.json``, its records, its ``predictions.json``.

    Args:
        save_dir: The save folder.
        signature (dict): What decides the predictions (model, mode, options, ``vid_stride``, tracker, shard);
            JSON-serialisable. :meth:`fingerprint` adds the weights' content hash. A folder whose ``job.json`` has
            another signature belongs to another job.
        items (list[tuple[int, Input]]): The run's inputs with their index in the whole sorted input list.
    """

    def __init__(self, save_dir, signature: dict, items: list):
        self.dir = Path(save_dir)
        self.signature = json.loads(json.dumps(signature))  # as it reads back from job.json
        self.items = items
        self.old = None  # the folder's job.json as found by prepare()
        self.weights = None  # weights_digest() of the model

    @property
    def key(self) -> str:
        return job_key(self.signature)

    def fingerprint(self, model) -> None:
        """Add the weights' content hash to the signature (reusing the one in ``job.json`` for an unchanged file)."""
        old = read_json(self.dir / JOB_FILE)
        known = old.get("weights") if isinstance(old, dict) else None
        self.weights = weights_digest(model, known if isinstance(known, dict) else None)
        self.signature["weights"] = None if self.weights is None else self.weights["sha256"]

    def record_path(self, inp) -> Path:
        return self.dir / RESULTS / f"{inp.name}.json"

    def record(self, inp) -> dict | None:
        """The input's record, or None when the input is not done by this job (no record, or another's)."""
        rec = read_json(self.record_path(inp))
        ok = isinstance(rec, dict) and rec.get("input") == inp.path and rec.get("job") == self.key
        return rec if ok else None

    def rel(self, path) -> str:
        return Path(path).relative_to(self.dir).as_posix()

    # ------------------------------------------------------------------------------------------- before the model

    def prepare(self, owner, planned: dict, force: bool = False, resume: bool = False) -> None:
        """Check, before the model loads and without writing anything, that this job may write its files.

        Args:
            owner: The save folder's :class:`~so_det_ultra.data.ownership.Ownership`.
            planned (dict[Input, list[Path]]): The files each input will write (annotated copy, labels, tracks).
            force (bool): Replace another job's results and files so-det predict did not write.
            resume (bool): Skip inputs done before; refused when they were written with other output options.

        Raises:
            JobError: An output would overwrite a source file, the folder holds another job's files, or a file so-det
                predict did not write (without ``force``); resume with other output options.
        """
        sources = {_resolved(inp.path) for inp in planned if inp.kind != "stream"}
        for paths in planned.values():
            for p in paths:
                if _resolved(p) in sources:
                    raise JobError(
                        f"--save-dir {self.dir}: the output {p.name} would overwrite the source file {p}; "
                        "choose a --save-dir outside the source folders"
                    )
        path = self.dir / JOB_FILE
        self.old = read_json(path)
        exists = path.exists() or path.is_symlink()
        if not exists:
            problem = None
        elif self.old is None:
            problem = "it is a symbolic link" if path.is_symlink() else "it is not readable JSON"
        else:
            problem = job_problem(self.old)
        ours = problem is None and exists and self.old.get("signature") == self.signature
        if exists and not ours and not force:
            self._refuse_other(problem)
        mine = [self.dir / JOB_FILE, self.dir / PREDICTIONS]
        mine += [p for inp, paths in planned.items() for p in (*paths, self.record_path(inp))]
        for p in mine:
            owner.check_claim(p)
        if resume:
            self._check_resume(planned)

    def _refuse_other(self, problem: str | None) -> None:
        hint = "use another --save-dir, or --force to replace them"
        if problem is not None:
            raise JobError(
                f"{self.dir / JOB_FILE} is not a job file of so-det predict ({problem}); use another --save-dir, "
                "or --force to replace it"
            )
        was, now = self.old["signature"], self.signature
        diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        raise JobError(
            f"--save-dir {self.dir} holds the results of another job (model {was.get('model')}, mode "
            f"{was.get('mode')}, shard {was.get('shard')}; this job: model {now.get('model')}, mode "
            f"{now.get('mode')}, shard {now.get('shard')}; differing: {', '.join(diff)}); {hint}"
        )

    def _check_resume(self, planned: dict) -> None:
        """Refuse ``--resume`` when inputs done before wrote other files than this run would write for them."""
        odd = []
        for inp, paths in planned.items():
            rec = self.record(inp)
            if rec is not None and not rec.get("skipped") and sorted(rec["files"]) != sorted(map(self.rel, paths)):
                odd.append((inp, rec.get("files", []), [self.rel(p) for p in paths]))
        if odd:
            inp, had, want = odd[0]
            raise JobError(
                f"--resume: {len(odd)} input(s) done before were written with other output options (first: "
                f"{inp.path} wrote {had or 'no files'}, this run would write {want or 'no files'}); --save, "
                "--save-txt and --track must apply to every input: rerun without --resume to redo them all, or with "
                "the output options of the earlier run"
            )

    # -------------------------------------------------------------------------------------------- after the model

    def begin(self, owner) -> list[str]:
        """Take the folder over (once the model has loaded): remove another job's records that its ``job.json``
        lists (``--force``), then write this job's ``job.json``. Returns notes for the user."""
        notes = []
        if job_problem(self.old) is None and self.old.get("signature") != self.signature:
            n = self._drop_records(owner)
            notes += [f"--force: removed {n} result record(s) of another job from {self.dir / RESULTS}"] if n else []
        with owner.transaction(f"{self.dir / JOB_FILE} is as it was"):
            doc = {"signature": self.signature, "weights": self.weights}
            doc["inputs"] = [[i, inp.path, inp.kind, inp.name] for i, inp in self.items]
            owner.write_text(self.dir / JOB_FILE, _io.json_text(doc))
        return notes

    def _drop_records(self, owner) -> int:
        """Delete the records the earlier job's ``job.json`` lists (and only those)."""
        n = 0
        for _index, path, _kind, name in self.old["inputs"]:
            rec_path = self.dir / RESULTS / f"{name}.json"
            rec = read_json(rec_path)
            if isinstance(rec, dict) and rec.get("input") == path:
                _io.check_inside(rec_path, self.dir)
                rec_path.unlink()
                n += 1
        return n

    def commit(self, owner, inp, record: dict, files: list) -> None:
        """Write the input's record (last, after its other outputs ``files``): from now on the input is done."""
        doc = {"input": inp.path, "kind": inp.kind, "job": self.key, "files": [self.rel(p) for p in files], **record}
        owner.write_text(self.record_path(inp), _io.json_text(doc))

    def assemble(self, owner) -> tuple[Path, int]:
        """Write ``predictions.json`` from the records of this run's inputs, in input order; (path, rows)."""
        rows = []
        for _, inp in self.items:
            rows += (self.record(inp) or {}).get("rows", [])
        with owner.transaction(f"{self.dir / PREDICTIONS} is as it was; the results of every input are kept"):
            owner.write_text(self.dir / PREDICTIONS, json.dumps(rows))
        return self.dir / PREDICTIONS, len(rows)


def write_predictions(path: Path, rows: list, replace: bool = True) -> Path:
    """``rows`` as a ``predictions.json`` at ``path`` (atomic; a link there is replaced, never written through).
    With ``replace=False`` a file there, also one another run wrote meanwhile, is kept: :class:`JobError`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(2, "the folder of OUT does not exist", str(path.parent))
    try:
        _io.atomic_write_text(path, json.dumps(rows), replace)
    except FileExistsError:
        raise JobError(
            f"{path} exists (written by another run meanwhile?); it is kept; use --force to overwrite it"
        ) from None
    return path


def _resolved(p) -> Path:
    return Path(p).expanduser().resolve()


def merge(out, shard_dirs, force: bool = False) -> tuple[Path, int, int]:
    """Join the records of shard save folders into one ``predictions.json`` at ``out``, in whole-list order.

    Returns:
        (Path, int, int): ``out``, the number of rows and of inputs.

    Raises:
        JobError: ``out`` exists (no ``force``); a folder is not a save folder; a job file or record is damaged (the
            message names the file); the shards were predicted with other settings, overlap, or miss inputs or shards
            (the last two pass with ``force``).
    """
    out = Path(out)
    if out.is_dir():
        raise JobError(f"OUT {out} is a folder; give the file to write, e.g. {out / PREDICTIONS}")
    if (out.exists() or out.is_symlink()) and not force:
        raise JobError(f"{out} exists; use --force to overwrite it")
    first, seen, found, rows_of = None, {}, set(), {}
    for d in map(Path, shard_dirs):
        job = read_json(d / JOB_FILE)
        if job is None:
            raise JobError(f"{d} has no readable {JOB_FILE}: not a save folder of so-det predict")
        problem = job_problem(job)
        if problem is not None:
            raise JobError(f"{d / JOB_FILE} is not a job file of so-det predict ({problem})")
        sig = dict(job["signature"])
        shard = sig.pop("shard", None)
        if shard is not None and not isinstance(shard, str):
            raise JobError(f"{d / JOB_FILE}: its shard is {shard!r}, not K/N")
        found.add(shard)
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
    return write_predictions(out, rows, replace=force), len(rows), len(rows_of)


def _collect(d: Path, job: dict, seen: dict, rows_of: dict) -> list[str]:
    """Add the records of save folder ``d`` to ``rows_of`` (index -> rows); returns the inputs without a record."""
    from so_det_ultra.metrics.predictions import check_rows

    key = job_key(job["signature"])
    missing = []
    for index, path, _kind, name in job["inputs"]:
        if index in seen:
            other, was = seen[index]
            if was != path:
                raise JobError(f"{other} and {d} were not predicted from the same sources ({was} vs {path})")
            raise JobError(f"input {path} is in both {other} and {d}; give each shard's folder once")
        rec_path = d / RESULTS / f"{name}.json"
        rec = read_json(rec_path)
        if not isinstance(rec, dict) or rec.get("input") != path or rec.get("job", key) != key:
            missing.append(path)
            continue
        try:
            check_rows(rec.get("rows"), rec_path)
        except ValueError as err:
            raise JobError(f"{err}; rerun that shard without --resume to rewrite its records") from None
        seen[index] = (d, path)
        rows_of[index] = rec["rows"]
    return missing


def _check_shards(found: set, force: bool) -> None:
    try:
        shards = [parse_shard(s) for s in found if s is not None]
    except ValueError as err:
        raise JobError(f"a {JOB_FILE} names a bad shard: {err}") from None
    if not shards:
        return
    n = {n for _, n in shards}
    if len(n) > 1:
        raise JobError(f"the folders hold shards of different splits (N = {sorted(n)})")
    lost = sorted(set(range(1, n.pop() + 1)) - {k for k, _ in shards})
    if lost and not force:
        raise JobError(f"shard(s) {', '.join(map(str, lost))} missing; add their folders, or merge anyway with --force")
