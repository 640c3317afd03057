"""The loop of ``so-det predict``: load the model once, then predict every input of the job and write its outputs.

For each input (an image, a video or a stream; :mod:`.sources`) in sorted order, skipping those already done with
``resume``: predict every frame with one :class:`~so_det_ultra.highres.engines.Predictor`, write the annotated copy
(an image, or an ``.mp4`` for a video or a stream), label files (``save_txt``), MOT track files (``track``), then the
input's record (:mod:`.jobs`). An unreadable image is skipped with a warning and the job goes on. A progress bar shows
frames and frames per second (Ultralytics' ``TQDM``).

Memory: dense prediction feeds the whole frame to the network (at the image's own size unless ``imgsz`` is given),
about 0.3 GB of CPU memory per megapixel of network input for so-det-n (docs/highres.md). Above ``max_pixels`` it
warns once, naming the frame and the sliced and sparse modes, which bound memory by the tile or patch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

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


def run(open_model, inputs: list, settings: Settings, signature: dict, shard=None, log=print) -> dict:
    """Predict the shard ``shard`` of ``inputs`` (all for None) into ``settings.save_dir``.

    ``open_model()`` returns the :class:`~so_det_ultra.highres.engines.Predictor`; it is called once, after the
    save folder's ownership checks passed (a refused job loads no model).

    Returns:
        (dict): ``inputs`` (in the shard), ``done`` (predicted now), ``skipped`` (done before, ``resume``),
            ``unreadable``, ``images``, ``videos``, ``frames`` (predicted now) and ``predictions`` (the
            ``predictions.json`` path, or None).
    """
    from ultralytics.utils import TQDM

    items = jobs.select_shard(inputs, shard)
    job = jobs.Job(settings.save_dir, signature, items)
    for note in job.prepare({inp: settings.planned(inp) for _, inp in items}, force=settings.force):
        log(note)
    todo = [inp for _, inp in items if not (settings.resume and job.record(inp) is not None)]
    try:
        predictor = open_model() if todo else None
    except BaseException:
        job.release()  # a model that does not load leaves no claim on the folder
        raise
    stats = dict(inputs=len(items), done=0, skipped=len(items) - len(todo), unreadable=0, images=0, videos=0, frames=0)
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
            record = _predict_input(predictor, inp, settings, bar, say)
            job.commit(inp, record)
            stats["done"] += 1
            stats["unreadable"] += bool(record.get("skipped"))
            stats["images" if inp.kind == "image" else "videos"] += not record.get("skipped")
            stats["frames"] += record["frames"]
    finally:
        bar.close()
    stats["predictions"] = job.assemble()[0] if settings.save_json else None
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
        total += int(cap.get(cv2.CAP_PROP_FRAME_COUNT) / stride)
        cap.release()
    return total


def _predict_input(predictor, inp, s: Settings, bar, log) -> dict:
    if inp.kind == "image":
        return _predict_image(predictor, inp, s, bar, log)
    return _predict_video(predictor, inp, s, bar, log)


def _predict_image(predictor, inp, s: Settings, bar, log) -> dict:
    img = sources.read_image(inp.path)
    if img is None:
        bar.update(1)
        return {"rows": [], "frames": 0, "skipped": "not a readable image"}
    _check_pixels(img.shape, s, inp.path)
    (res,) = predictor([img], [inp.path])
    bar.update(1)
    if s.save:
        outputs.write_image(s.save_dir / inp.name, res.plot())
    if s.save_txt:
        outputs.atomic_write_text(s.save_dir / "labels" / f"{Path(inp.name).stem}.txt", outputs.label_text(res))
    log(f"{inp.path}: {_describe(res)}")
    return {"rows": outputs.coco_rows(res, inp.stem, Path(inp.path).name), "frames": 1}


def _predict_video(predictor, inp, s: Settings, bar, log) -> dict:
    from so_det_ultra.highres import track

    try:
        frames = sources.Frames(inp, s.vid_stride)
    except (FileNotFoundError, ConnectionError) as err:
        log(f"WARNING so-det predict: skipping {inp.path}: {err}")
        return {"rows": [], "frames": 0, "skipped": str(err)}
    sink = outputs.VideoSink(s.save_dir / inp.name, frames.fps) if s.save else None
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
    if sink is not None:
        sink.commit()
    if tracker is not None:
        outputs.atomic_write_text(s.save_dir / "tracks" / f"{Path(inp.name).stem}.txt", "".join(f"{x}\n" for x in mot))
    fps = n / max(time.perf_counter() - t0, 1e-9)
    log(f"{inp.path}: {n} frames, {len(rows)} boxes, {fps:.1f} frames/s")
    return {"rows": rows, "frames": n}


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
