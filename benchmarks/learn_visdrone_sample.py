"""Sanity check of learning on real frames: train models identically from scratch on the VisDrone sample.

Converts ``../shared/data/visdrone-sample`` (269 real VisDrone train images) into YOLO layout with a deterministic
held-out split (every 5th image), trains each model for the same budget and reports mAP50 / mAP50-95 on the held-out
part. These are NOT VisDrone results (a few hundred images, a short budget, no pretraining): they show that a model
learns on real drone frames and how the models compare under one identical budget.

    python benchmarks/learn_visdrone_sample.py --epochs 10 --imgsz 640     # the run in docs/models.md
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ["pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning-tricycle", "bus", "motor"]


def convert(sample: Path, out: Path) -> Path:
    """YOLO layout of the sample with every 5th image held out; prefers the package's VisDrone converter."""
    out.mkdir(parents=True, exist_ok=True)
    stems = sorted(p.stem for p in (sample / "images").glob("*.jpg"))
    import cv2

    for k, stem in enumerate(stems):
        split = "val" if k % 5 == 4 else "train"
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        img = out / "images" / split / f"{stem}.jpg"
        if not img.exists():
            os.symlink((sample / "images" / f"{stem}.jpg").resolve(), img)
        h, w = cv2.imread(str(img)).shape[:2]
        rows = []
        for line in (sample / "annotations" / f"{stem}.txt").read_text().splitlines():
            f = [v for v in line.strip().split(",") if v != ""]
            if len(f) < 6:
                continue
            x, y, bw, bh, score, cat = (int(float(v)) for v in f[:6])
            if score == 0 or not 1 <= cat <= 10 or bw <= 0 or bh <= 0:
                continue
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            if x1 > x0 and y1 > y0:
                rows.append(
                    f"{cat - 1} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
                )
        (out / "labels" / split / f"{stem}.txt").write_text("\n".join(rows) + "\n")
    data = out / "data.yaml"
    data.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames: {dict(enumerate(NAMES))}\n")
    return data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", default=str(REPO.parent / "shared" / "data" / "visdrone-sample"))
    p.add_argument("--out", default="runs/learn-visdrone-sample")
    p.add_argument("--models", nargs="+", default=["so-det-s.yaml", "yolo11n.yaml", "yolov8n-p2.yaml"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)

    from ultralytics import YOLO

    out = Path(a.out).resolve()
    data = convert(Path(a.sample), out / "data")
    rows = {}
    for name in a.models:
        t0 = time.time()
        model = YOLO(name)
        model.train(
            data=str(data),
            epochs=a.epochs,
            imgsz=a.imgsz,
            batch=a.batch,
            workers=a.workers,
            device="cpu",
            seed=0,
            deterministic=True,
            plots=False,
            project=str(out),
            name=Path(name).stem,
            exist_ok=True,
            pretrained=False,
            amp=False,
        )
        m = YOLO(str(out / Path(name).stem / "weights" / "best.pt")).val(
            data=str(data), imgsz=a.imgsz, batch=a.batch, device="cpu", plots=False, verbose=False
        )
        rows[Path(name).stem] = {
            "mAP50": float(m.box.map50),
            "mAP50-95": float(m.box.map),
            "minutes": (time.time() - t0) / 60,
        }
        print(rows[Path(name).stem], flush=True)
    print(f"\n{a.epochs} epochs, imgsz {a.imgsz}, batch {a.batch}, from scratch, CPU; held-out: every 5th image\n")
    print("| model | mAP50 | mAP50-95 | train+val minutes |\n|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} | {r['minutes']:.1f} |")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
