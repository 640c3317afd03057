"""Why a learned seeker picks more patches than the oracle: precision-recall curves and a picture of one frame.

ESOD (Liu et al., IEEE TIP 2024, sec. 3) runs the detector only on the patches its seeker's heatmap selects; the oracle
heatmap (``heatmap_target`` of the ground truth) marks exactly the objects' cells. On ``bench_highres.py``'s
held-out frames, for each checkpoint given:

- ``seeker_pr.png``, left: patches per frame against seeker recall (share of objects >= 4 px whose centre lies in a
  selected patch core), as the heatmap threshold goes from 0.02 to 0.98, with the same slicer as sparse inference
  (``so_det_ultra.training.seeker.seeker_recall``); the learned heatmap's curve, the oracle's (its Gaussian
  thresholded from 0.5 to 0.98) and, marked, each checkpoint's stored threshold. Right: the learned heatmap's
  cell-level precision against recall, the positives being the cells the oracle marks (the oracle's own point is
  (1, 1)).
- ``seeker_frame.png``: one frame (``--frame``) with the learned heatmap and its patches (left) and the oracle heatmap
  and its patches (right); objects whose centre no learned patch holds are ringed in red.

The numbers behind the curves are printed (recall, patches per frame at the recall targets). Run::

    python benchmarks/seeker_figures.py --weights "fitted=runs/dense/best-seeker.pt" "joint=runs/dense/best.pt" \\
        --out docs/img
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = np.round(np.arange(0.02, 0.99, 0.02), 2)


def _bench():
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_highres", REPO / "benchmarks" / "bench_highres.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def frames_and_maps(path, images, gts, bh):
    """Per frame: (letterboxed RGB image, learned heatmap, oracle heatmap, object centres in cells, the letterbox
    geometry) for checkpoint ``path``; and the SparseModel."""
    from so_det_ultra.highres import common
    from so_det_ultra.highres.sparse import SparseModel

    sm = SparseModel(common.load_model(path))
    oracle = bh.oracle_heatmap(gts, sm.cell)
    out = []
    for n, (img, (objs, _)) in enumerate(zip(images, gts)):
        x = common.letterbox(img, None, sm.stride)
        _, prob = sm.run_stem(x)
        heat = oracle(n, img.shape[:2], tuple(x.shape[2:]), tuple(prob.shape))
        r, (px, py) = bh.letterbox_geometry(*img.shape[:2], tuple(x.shape[2:]))
        big = ((objs[:, 3] - objs[:, 1]) >= 4) & ((objs[:, 4] - objs[:, 2]) >= 4)
        o = objs[big]
        c = np.stack((((o[:, 2] + o[:, 4]) / 2 * r + py) / sm.cell, ((o[:, 1] + o[:, 3]) / 2 * r + px) / sm.cell), 1)
        rgb = (x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        out.append((rgb, prob, heat, c.reshape(-1, 2)))
    return sm, out


def curves(sm, maps):
    """Rows (thr, seeker recall, patches/frame) for the learned and the oracle heatmaps, and the learned heatmap's
    cell-level (thr, precision, recall) against the oracle's marked cells."""
    from so_det_ultra.training.seeker_threshold import recall_at

    slicer = {"align": sm.align}
    learned = [(t, *recall_at([(p, c) for _, p, _, c in maps], float(t), **slicer)) for t in THRESHOLDS]
    oracle = [(t, *recall_at([(h, c) for _, _, h, c in maps], float(t), **slicer)) for t in THRESHOLDS if t >= 0.5]
    pos = torch.cat([(h > 0).flatten() for _, _, h, _ in maps])
    prob = torch.cat([p.flatten() for _, p, _, _ in maps])
    cells = []
    for t in THRESHOLDS:
        on = prob >= t
        tp = int((on & pos).sum())
        cells.append((t, tp / max(int(on.sum()), 1), tp / max(int(pos.sum()), 1)))
    return learned, oracle, cells


def plot_curves(results, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for k, (label, sm, learned, oracle, cells) in enumerate(results):
        color = f"C{k}"
        ax1.plot([100 * r for _, r, _ in learned], [n for _, _, n in learned], "-", color=color, label=f"{label}")
        stored = min(learned, key=lambda row: abs(row[0] - sm.threshold))
        ax1.plot(100 * stored[1], stored[2], "o", color=color, ms=8)
        ax1.annotate(f"thr {sm.threshold:.2f}", (100 * stored[1], stored[2]), textcoords="offset points", xytext=(5, 5))
        ax2.plot([100 * r for _, _, r in cells], [100 * p for _, p, _ in cells], "-", color=color, label=label)
        if k == 0:
            ax1.plot([100 * r for _, r, _ in oracle], [n for _, _, n in oracle], "k--", label="oracle (GT heatmap)")
    ax2.plot([100], [100], "k*", ms=12, label="oracle")
    ax1.set(xlabel="seeker recall (% of objects in selected patches)", ylabel="patches per frame", xlim=(80, 100.5))
    ax1.set_title("patches needed for a seeker recall (threshold 0.02-0.98)")
    ax2.set(xlabel="cell recall (% of oracle cells >= threshold)", ylabel="cell precision (%)")
    ax2.set_title("heatmap cells against the oracle's")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_frame(label, sm, maps, n: int, out: Path):
    """The frame ``n`` with the learned and the oracle heatmaps, each with its selected patch cores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from so_det_ultra.nn.slicer import official_patch, patch_cores, select_patches

    rgb, prob, heat, centres = maps[n]
    fig, axes = plt.subplots(1, 2, figsize=(16, 5.4))
    p = official_patch(tuple(prob.shape), sm.align)
    for ax, (name, h, thr) in zip(axes, ((f"{label}: learned", prob, sm.threshold), ("oracle", heat, 0.5))):
        cores = patch_cores(select_patches(h, thr, p, sm.align), tuple(h.shape), p)
        ax.imshow(rgb)
        big = cv2.resize(h.numpy(), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
        ax.imshow(np.ma.masked_less(big, 0.1), cmap="jet", alpha=0.45, vmin=0, vmax=1)  # cells < 0.1 left clear
        inside = np.zeros(len(centres), bool)
        for y0, x0, y1, x1 in cores:
            ax.add_patch(Rectangle((x0 * sm.cell, y0 * sm.cell), (x1 - x0) * sm.cell, (y1 - y0) * sm.cell,
                                   fill=False, ec="lime", lw=1.2))  # fmt: skip
            inside |= (centres[:, 0] >= y0) & (centres[:, 0] < y1) & (centres[:, 1] >= x0) & (centres[:, 1] < x1)
        miss = centres[~inside] * sm.cell
        ax.scatter(miss[:, 1], miss[:, 0], s=60, facecolors="none", edgecolors="red", linewidths=1.5)
        ax.set_title(f"{name}, threshold {thr:.2f}: {len(cores)} patches, {inside.sum()}/{len(centres)} objects held")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", required=True, help="LABEL=checkpoint, each with a seeker")
    p.add_argument("--sample", default=str(REPO.parent / "shared" / "data" / "visdrone-sample"))
    p.add_argument("--frames", type=int, default=4, help="held-out frames per size (as bench_highres.py)")
    p.add_argument("--frame", type=int, default=0, help="frame of the picture (index among those frames)")
    p.add_argument("--out", default=".", help="folder for seeker_pr.png and seeker_frame.png")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    bh = _bench()
    sample = Path(a.sample)
    held, _ = bh.split_frames(sample)
    sizes = {q: cv2.imread(str(q)).shape[:2] for q in held}
    frames = [q for hw in bh.SIZES for q in [f for f in held if sizes[f] == hw][: a.frames]]
    images = [cv2.imread(str(q)) for q in frames]
    gts = [bh.ground_truth(q.stem, sample, im.shape[1], im.shape[0]) for q, im in zip(frames, images)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for k, spec in enumerate(a.weights):
        label, _, path = spec.rpartition("=")
        label = label or Path(path).stem
        sm, maps = frames_and_maps(path, images, gts, bh)
        learned, oracle, cells = curves(sm, maps)
        results.append((label, sm, learned, oracle, cells))
        if k == 0:
            plot_frame(label, sm, maps, a.frame, out / "seeker_frame.png")
        print(f"\n{label} (stored threshold {sm.threshold:.2f}), {len(frames)} frames:")
        print("| seeker recall at least | learned: threshold, patches/frame | oracle: threshold, patches/frame |")
        print("|---|---|---|")
        for target in (1.0, 0.98, 0.95, 0.9, 0.8):
            row = []
            for curve in (learned, oracle):
                ok = [r for r in curve if r[1] >= target - 1e-9]
                best = min(ok, key=lambda r: r[2]) if ok else None
                row.append(f"{best[0]:.2f}, {best[2]:.1f}" if best else "-")
            print(f"| {100 * target:.0f} % | {row[0]} | {row[1]} |")
    plot_curves(results, out / "seeker_pr.png")
    print(f"\nwritten: {out / 'seeker_pr.png'}, {out / 'seeker_frame.png'}")


if __name__ == "__main__":
    main()
