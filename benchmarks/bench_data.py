"""Resource use of converting and evaluating a VisDrone-val-sized split: wall time, images/s, peak memory.

The VisDrone2019-DET val split (548 images, about 39k objects) is simulated by repeating the images of the shared
VisDrone sample under new names (hard links, annotation files copied) in a temporary folder. Then, each in its own
process (the stock console scripts, as a user runs them):

1. ``so-det convert visdrone SRC DST --split val --no-progress`` (default image mode: copy);
2. ``so-det eval --data DST/data.yaml --split val --pred pred.json``, with ``pred.json`` the converted ground truth
   jittered (boxes moved by up to 20% of their size, random scores, one false positive per ten objects).

Peak memory is the largest resident set size of the step's process tree (``getrusage(RUSAGE_CHILDREN).ru_maxrss``
read in a wrapper process, so children are included). Goals: peak < 1 GiB and >= 50 images/s for each step.

Usage:
    python benchmarks/bench_data.py [--sample DIR] [--images 548] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLE = Path(os.environ.get("SO_DET_VISDRONE_SAMPLE", REPO.parent / "shared" / "data" / "visdrone-sample"))
GOAL_RSS_MIB, GOAL_IPS = 1024, 50
WRAPPER = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(r.returncode)\n"
)


def make_source(sample: Path, root: Path, n: int) -> tuple[Path, int]:
    """``root/VisDrone2019-DET-val`` with ``n`` images cycled from ``sample``; returns it and the annotation rows."""
    split = root / "VisDrone2019-DET-val"
    (split / "images").mkdir(parents=True)
    (split / "annotations").mkdir()
    stems = sorted(p.stem for p in (sample / "images").glob("*.jpg"))
    rows = 0
    for k in range(n):
        stem, name = stems[k % len(stems)], f"{stems[k % len(stems)]}_r{k // len(stems)}"
        src = sample / "images" / f"{stem}.jpg"
        try:
            os.link(src, split / "images" / f"{name}.jpg")
        except OSError:
            shutil.copy2(src, split / "images" / f"{name}.jpg")
        text = (sample / "annotations" / f"{stem}.txt").read_text()
        (split / "annotations" / f"{name}.txt").write_text(text)
        rows += sum(1 for line in text.splitlines() if line.strip())
    return root, rows


def jittered_predictions(dst: Path, out: Path, seed: int = 0) -> int:
    """COCO detections from the converted ground truth, jittered; returns how many."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dets = []
    for side in sorted((dst / "sidecars" / "val").glob("*.json")):
        meta = json.loads(side.read_text())
        w, h = meta["width"], meta["height"]
        for obj in meta["objects"]:
            x1, y1, x2, y2 = obj["box"]
            bw, bh = x2 - x1, y2 - y1
            dx, dy, sw, sh = rng.uniform(-0.2, 0.2, 4)
            box = [x1 + dx * bw, y1 + dy * bh, bw * (1 + sw), bh * (1 + sh)]
            dets.append({"image_id": side.stem, "category_id": obj["cls"] + 1, "bbox": box, "score": rng.random()})
            if rng.random() < 0.1:  # a false positive somewhere in the image
                fx, fy = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
                dets.append(
                    {
                        "image_id": side.stem,
                        "category_id": int(rng.integers(1, 11)),
                        "bbox": [fx, fy, 15.0, 15.0],
                        "score": rng.random() * 0.5,
                    }
                )
    for d in dets:
        d["bbox"] = [round(float(v), 2) for v in d["bbox"]]
        d["score"] = round(float(d["score"]), 4)
    out.write_text(json.dumps(dets))
    return len(dets)


def measure(cmd: list) -> tuple[float, float]:
    """Run ``cmd`` in a wrapper process: (wall seconds, peak RSS of its process tree in MiB)."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *map(str, cmd)],
        capture_output=True,
        text=True,
        env={**os.environ, "YOLO_OFFLINE": "1"},
    )
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", type=Path, default=SAMPLE, help="VisDrone sample folder (images/, annotations/)")
    p.add_argument("--images", type=int, default=548, help="images in the simulated split (VisDrone val: 548)")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    a = p.parse_args(argv)
    if not (a.sample / "annotations").is_dir():
        print(f"VisDrone sample not found at {a.sample} (set SO_DET_VISDRONE_SAMPLE)", file=sys.stderr)
        return 2
    work = a.keep or Path(tempfile.mkdtemp(prefix="so-det-bench-data-"))
    try:
        src, rows = make_source(a.sample, work / "src", a.images)
        dst = work / "dst"
        t_conv, rss_conv = measure([BIN / "so-det", "convert", "visdrone", src, dst, "--split", "val", "--no-progress"])
        summary = (dst / "convert-visdrone.log").read_text()
        objects = next(line for line in summary.splitlines() if line.startswith("objects written"))
        n_pred = jittered_predictions(dst, work / "pred.json")
        cmd = [BIN / "so-det", "eval", "--data", dst / "data.yaml", "--split", "val", "--pred", work / "pred.json"]
        t_eval, rss_eval = measure(cmd)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"bench_data.py {datetime.date.today()}: {a.images} images, {rows} annotation rows, {objects}")
    print(
        f"{'step':<10}{'wall s':>8}{'images/s':>10}{'peak RSS MiB':>14}  goal (< {GOAL_RSS_MIB} MiB, >= {GOAL_IPS}/s)"
    )
    ok = True
    for step, t, rss in (("convert", t_conv, rss_conv), (f"eval ({n_pred} dets)", t_eval, rss_eval)):
        ips = a.images / t
        good = rss < GOAL_RSS_MIB and ips >= GOAL_IPS
        ok &= good
        print(f"{step:<10}{t:8.2f}{ips:10.1f}{rss:14.0f}  {'ok' if good else 'MISSED'}")
    print("(wall time includes process start and imports, about 1-2 s per step)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
