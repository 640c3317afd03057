"""The loop of ``so-det predict``: load the model once, then predict every input of the job and write its outputs.

The save folder is locked for the run and owned as every so-det-ultra output folder
(:mod:`so_det_ultra.data.ownership`); its checks run before the model loads. For each input (an image, a video or a
stream; :mod:`.sources`) in sorted order, skipping those already done with ``resume``: predict every frame with one
:class:`~so_det_ultra.highres.engines.Predictor`, write the annotated copy (an image, or an ``.mp4`` for a video or a
stream), label files (``save_txt``), MOT track files (``track``), then the input's record (:mod:`.jobs`), all in one
transaction: an input that fails half-way (a full disk) leaves its earlier outputs as they were. An unreadable image or
video is skipped with a warning, counted, and the job goes on. A progress bar shows frames and frames per second
(Ultralytics' ``TQDM``).

Memory: dense prediction feeds the whole frame to the network (at the image's own size unless ``imgsz`` is given),
about 0.3 GB of CPU memory per megapixel of network input for so-det-n (docs/highres.md). Above ``max_pixels`` it
warns once, naming the frame and the sliced and sparse modes, which bound memory by the tile or patch size.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from so_det_ultra.data.ownership import Ownership, check_lock_timeout, dst_lock
from so_det_ultra.highres import jobs, outputs, sources

MAX_PIXELS = 4_000_000  # network-input pixels above which dense prediction warns (about 1.2 GB for so-det-n on CPU)


@dataclass
class Settings:
    """What a job writes and how it reads its inputs (the ``so-det predict`` output options)."""

    save_dir: Path
    save: bool = True
    save_txt: bool = False
    save_json: bool = False
    track: bool = False
    tracker: str = "bytetrack.yaml"
    vid_stride: int = 1
    resume: bool = False
    force: bool = False
    lock_timeout: float | None = None
    max_pixels: int = MAX_PIXELS
    dense: bool = False  # dense mode: the pixel budget applies
    dense_imgsz: int | None = None  # the dense predictor's imgsz (None: each image's own size)
    warned: set = field(default_factory=set)

    def planned(self, inp: sources.Input) -> list[Path]:
        """The files ``inp`` writes besides its record."""
        stem = Path(inp.name).stem
        out = [self.save_dir / inp.name] if self.save else []
        if inp.kind == "image" and self.save_txt:
            out.append(self.save_dir / "labels" / f"{stem}.txt")
        if inp.kind != "image" and self.track:
            out.append(self.save_dir / "tracks" / f"{stem}.txt")
        return out


def run(open_model, inputs: list, settings: Settings, signature: dict, shard=None, log=print, model=None) -> dict:
    """Predict the shard ``shard`` of ``inputs`` (all for None) into ``settings.save_dir``.

    ``open_model()`` returns the :class:`~so_det_ultra.highres.engines.Predictor`; it is called once, under the save
    folder's lock and after its ownership checks passed (a refused job loads no model, a model that fails to load
    changes nothing). ``model`` (its path) gives the job signature the weights' content hash.

    Returns:
        (dict): ``inputs`` (in the shard), ``done`` (predicted now), ``skipped`` (done before, ``resume``),
            ``unreadable``, ``images``, ``videos``, ``frames`` (predicted now) and ``predictions`` (the
            ``predictions.json`` path, or None).
    """
    items = jobs.select_shard(inputs, shard)
    job = jobs.Job(settings.save_dir, signature, items)
    planned = {inp: settings.planned(inp) for _, inp in items}
    check_lock_timeout(settings.lock_timeout)
    _, owned = Ownership.check(settings.save_dir, "predict", settings.force, empty=False)
    job.fingerprint(model)
    dry = Ownership(settings.save_dir, "predict", {}, owned, settings.force)  # refusals before the folder is touched
    job.prepare(dry, planned, settings.force, settings.resume)
    with dst_lock(settings.save_dir, settings.lock_timeout):  # the checks again, under the lock
        owner = Ownership.start(settings.save_dir, "predict", {}, settings.force, empty=False)
        try:
            job.prepare(owner, planned, settings.force, settings.resume)
            todo = [inp for _, inp in items if not (settings.resume and job.record(inp) is not None)]
            predictor = open_model() if todo else None
            for note in job.begin(owner):
                log(note)
            stats = _predict_all(predictor, job, owner, todo, settings, log)
            stats.update(inputs=len(items), skipped=len(items) - len(todo))
            stats["predictions"] = job.assemble(owner)[0] if settings.save_json else None
        except BaseException:
            with contextlib.suppress(OSError):  # record what the finished inputs wrote; the first error is the news
                owner.finish()
            owner.close()
            raise
        owner.finish()
    return stats


def _predict_all(predictor, job, owner, todo: list, settings: Settings, log) -> dict:
    """Predict ``todo``, each input one transaction of ``owner`` ending with its record; the counts."""
    from ultralytics.utils import TQDM

    stats = dict(done=0, unreadable=0, images=0, videos=0, frames=0)
    bar = TQDM(total=_frame_total(todo, settings.vid_stride), unit="frame", desc="so-det predict")
    tty = getattr(bar.file, "isatty", lambda: False)()

    def say(line: str) -> None:  # a line above the progress bar
        if tty:
            bar.clear()
        log(line)
        if tty:
            bar.refresh()

    try:
        for inp in todo:
            kept = f"the earlier outputs of {inp.path} are kept; inputs before it are done (rerun with --resume)"
            with owner.transaction(kept):
                record, files = _predict_input(predictor, inp, settings, owner, bar, say)
                job.commit(owner, inp, record, files)
            stats["done"] += 1
            stats["unreadable"] += bool(record.get("skipped"))
            stats["images" if inp.kind == "image" else "videos"] += not record.get("skipped")
            stats["frames"] += record["frames"]
    finally:
        bar.close()
    return stats


def _frame_total(todo: list, stride: int) -> int | None:
    """Frames the job will predict (None when a stream is among them), for the progress bar."""
    import cv2

    total = 0
    for inp in todo:
        if inp.kind == "stream":
            return None
        if inp.kind == "image":
            total += 1
            continue
        cap = cv2.VideoCapture(inp.path)
        total += max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) / stride), 0)
        cap.release()
    return total


def _predict_input(predictor, inp, s: Settings, owner, bar, log) -> tuple[dict, list]:
    """The input's record (rows, frames, ``skipped`` with the reason when unreadable) and the files it wrote."""
    if inp.kind == "image":
        return _predict_image(predictor, inp, s, owner, bar, log)
    return _predict_video(predictor, inp, s, owner, bar, log)


def _skipped(inp, why: str, log) -> tuple[dict, list]:
    log(f"WARNING so-det predict: skipping {inp.path}: {why}")
    return {"rows": [], "frames": 0, "skipped": why}, []


def _predict_image(predictor, inp, s: Settings, owner, bar, log) -> tuple[dict, list]:
    img = sources.read_image(inp.path)
    bar.update(1)
    if img is None:
        return _skipped(inp, "not a readable image", log)
    _check_pixels(img.shape, s, inp.path)
    (res,) = predictor([img], [inp.path])
    files = []
    if s.save:
        files.append(outputs.write_image(owner, s.save_dir / inp.name, res.plot()))
    if s.save_txt:
        files.append(s.save_dir / "labels" / f"{Path(inp.name).stem}.txt")
        owner.write_text(files[-1], outputs.label_text(res))
    log(f"{inp.path}: {_describe(res)}")
    return {"rows": outputs.coco_rows(res, inp.stem, Path(inp.path).name), "frames": 1}, files


def _predict_video(predictor, inp, s: Settings, owner, bar, log) -> tuple[dict, list]:
    from so_det_ultra.highres import track

    try:
        frames = sources.Frames(inp, s.vid_stride)
    except (FileNotFoundError, ConnectionError) as err:
        return _skipped(inp, str(err), log)
    sink = outputs.VideoSink(owner, s.save_dir / inp.name, frames.fps) if s.save else None
    tracker = track.make_tracker(s.tracker, frames.fps) if s.track else None
    rows, mot, n, t0 = [], [], 0, time.perf_counter()
    try:
        for index, img in _until_interrupt(frames, inp.kind == "stream"):
            if n == 0:
                _check_pixels(img.shape, s, inp.path)
            (res,) = predictor([img], [inp.path])
            rows += outputs.coco_rows(res, f"{inp.stem}_{index:06d}")
            if tracker is not None:
                res, tracks = track.update(tracker, res)
                mot += outputs.mot_lines(index + 1, tracks)
            if sink is not None:
                sink.write(res.plot())
            n += 1
            bar.update(1)
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    if n == 0 and inp.kind == "video":
        return _skipped(inp, "no frame could be read (not a readable video)", log)
    files = [sink.commit()] if sink is not None and sink.frames else []
    if tracker is not None:
        files.append(s.save_dir / "tracks" / f"{Path(inp.name).stem}.txt")
        owner.write_text(files[-1], "".join(f"{x}\n" for x in mot))
    fps = n / max(time.perf_counter() - t0, 1e-9)
    log(f"{inp.path}: {n} frames, {len(rows)} boxes, {fps:.1f} frames/s")
    return {"rows": rows, "frames": n}, files


def _until_interrupt(frames, stream: bool):
    """The frames; for a stream, Ctrl-C ends it like the end of a file (its results are written)."""
    try:
        yield from frames
    except KeyboardInterrupt:
        if not stream:
            raise


def _describe(res) -> str:
    extra = f", {len(res.patches)} patches" if hasattr(res, "patches") else ""
    if hasattr(res, "n_tiles"):
        extra += f", {res.n_tiles} tiles" + (" + full frame" if getattr(res, "full_frame", False) else "")
    ms = sum(res.speed.get(k, 0) for k in ("preprocess", "inference", "postprocess"))
    return f"{len(res.boxes)} boxes{extra}, {ms:.0f} ms"


def _check_pixels(shape, s: Settings, path: str) -> None:
    """Warn (once per job) when dense prediction's network input exceeds the pixel budget ``s.max_pixels``."""
    if not s.dense or not s.max_pixels or s.max_pixels <= 0 or "pixels" in s.warned:
        return
    h, w = shape[:2]
    scale = (s.dense_imgsz or max(h, w)) / max(h, w)
    pixels = h * w * scale * scale
    if pixels > s.max_pixels:
        s.warned.add("pixels")
        from ultralytics.utils import LOGGER

        LOGGER.warning(
            f"so-det predict: dense prediction of {path} ({w}x{h}) feeds {pixels / 1e6:.3g} MP to the network, above "
            f"the budget of {s.max_pixels / 1e6:g} MP (--max-pixels); memory grows with it (about 0.3 GB per MP "
            "for so-det-n on CPU). Use --imgsz to downscale, or --mode sliced / sparse."
        )
