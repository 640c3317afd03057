"""How close sparse inference gets to what a heatmap allows: the ideal speed-up and the engine's efficiency.

For one frame and a set of patches (ESOD, Liu et al., IEEE TIP 2024, sec. 3: the stem and the seeker run on the whole
frame, the rest of the network on the patches only):

- the dense pipeline's time splits into fixed costs (letterbox, NMS), the stem (every layer up to the seeker) and
  the rest of the network, each timed on the whole frame (:func:`time_parts`);
- the covered fraction is the share of the frame's heatmap cells inside at least one patch crop (core plus margin):
  the share of the rest's work that an engine without any overhead or overlap would still do (:func:`covered`);
- ideal speed-up = dense / (fixed + stem + covered x rest at patch scale), with dense = fixed + stem + rest.

"Rest at patch scale" is the rest of the network run over the whole frame cut into crops of the patches' size,
scaled to the frame's area. It differs from the rest on the whole frame where the network's cost is not linear in
area: so-det's C2PSA attends over all cells of its input, so the whole frame costs more per cell than its pieces (the
linear estimate, covered x whole-frame rest, is printed beside it). Efficiency = measured speed-up (dense / sparse,
end to end) / ideal: what patch selection, cropping, batching, crop overlap and merging cost on top.

The sum of the crops' areas over the frame's is reported beside it, one crop per patch and as the engine ran them
(overlapping crops merged, rounded up to bucket shapes): where it exceeds the covered fraction, neighbouring crops
overlap and their shared parts are computed twice.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

# what the benchmarks time with: wall time, or (--clock cpu) the process's CPU time, which a loaded machine still
# measures with 1 thread (CPU time counts the work, not the waiting; with several threads it also counts their spinning)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def covered(patches, cells_hw, runs=None) -> tuple[float, float, float]:
    """(union, sum, what the engine ran) of the patches' crops as shares of the ``cells_hw`` heatmap cells; the last
    is the sum of ``runs``' crops (a result's ``runs``: merged, in bucket shapes; :func:`~so_det_ultra.highres.sparse.
    plan_runs`), by default the patches merged without buckets (:func:`so_det_ultra.highres.runs.merge_crops`)."""
    from so_det_ultra.highres.runs import merge_crops

    h, w = cells_hw
    mask = torch.zeros(h, w, dtype=torch.bool)
    for p in patches:
        y0, x0, y1, x1 = p.crop
        mask[y0:y1, x0:x1] = True

    def area(crops):
        return sum((c[2] - c[0]) * (c[3] - c[1]) for c in crops) / (h * w)

    runs = merge_crops(patches) if runs is None else runs
    return float(mask.float().mean()), area(p.crop for p in patches), area(r.crop for r in runs)


@torch.no_grad()
def time_parts(sm, img, conf: float, max_det: int, crop_hw=None, batch: int = 16) -> dict:
    """ms of the dense pipeline's parts on ``img``: fixed (letterbox + NMS), stem, rest (on the whole frame) and
    ``rest_tiled``: the rest run on the whole frame cut into ``crop_hw``-cell crops (batched as the engine batches
    patches), scaled to the frame's area, i.e. what the rest costs per cell at the patches' scale."""
    from ultralytics.utils.nms import non_max_suppression

    from so_det_ultra.highres import common

    t0 = clock()
    x = common.letterbox(img, None, sm.stride)
    t1 = clock()
    stem_out, _ = sm.run_stem(x)
    t2 = clock()
    raw = sm.run_rest(stem_out)
    t3 = clock()
    non_max_suppression(raw, conf, 0.7, max_det=max_det, max_time_img=60)
    t4 = clock()
    out = {"fixed": (t1 - t0 + t4 - t3) * 1000, "stem": (t2 - t1) * 1000, "rest": (t3 - t2) * 1000}
    out["rest_tiled"] = _rest_tiled(sm, stem_out, x.shape[2] // sm.cell, x.shape[3] // sm.cell, crop_hw, batch)
    return out


def _rest_tiled(sm, stem_out: dict, h: int, w: int, crop_hw, batch: int) -> float:
    if crop_hw is None:
        return float("nan")
    ch, cw = min(crop_hw[0], h), min(crop_hw[1], w)
    corners = [(min(y, h - ch), min(x, w - cw)) for y in range(0, h, ch) for x in range(0, w, cw)]
    ms = 0.0
    for i in range(0, len(corners), batch):
        crops = {
            j: torch.cat([t[..., y * f : (y + ch) * f, x * f : (x + cw) * f] for y, x in corners[i : i + batch]])
            for j, t in stem_out.items()
            for f in (sm.factor[j],)
        }
        t0 = clock()
        sm.run_rest(crops)
        ms += (clock() - t0) * 1000
    return ms * (h * w) / (len(corners) * ch * cw)


def summarise(rows: dict, parts: list, cover: dict, sets: dict) -> dict:
    """Per frame set and sparse mode: dense ms, ideal and measured speed-ups, efficiency.

    ``rows[mode]["ms"]`` are per-run times (frame-major within each round), ``parts`` the matching
    :func:`time_parts` dicts, ``cover[mode]`` one (union, sum) per frame, ``sets`` name -> frame indices.
    """
    n_frames = len(next(iter(cover.values())))
    out = {}
    for name, idx in sets.items():
        for mode, cov in cover.items():
            pick = [k for k in range(len(parts)) if k % n_frames in idx]
            part = {p: statistics.mean(parts[k][p] for k in pick) for p in ("fixed", "stem", "rest", "rest_tiled")}
            f = statistics.mean(cov[k][0] for k in idx)
            work = statistics.mean(cov[k][1] for k in idx)
            runs = statistics.mean(cov[k][2] for k in idx)
            dense = statistics.mean(rows["dense"]["ms"][k] for k in pick)
            sparse = statistics.mean(rows[mode]["ms"][k] for k in pick)
            base = part["fixed"] + part["stem"] + part["rest"]
            linear = base / (part["fixed"] + part["stem"] + f * part["rest"])
            ideal = base / (part["fixed"] + part["stem"] + f * part["rest_tiled"])
            out[name, mode] = dict(
                dense=dense,
                sparse=sparse,
                **part,
                covered=f,
                work=work,
                runs=runs,
                linear=linear,
                ideal=ideal,
                speedup=dense / sparse,
            )
            out[name, mode]["efficiency"] = out[name, mode]["speedup"] / ideal
    return out


def print_table(summary: dict) -> None:
    print(
        "\n| frames | heatmap | dense ms | fixed / stem / rest / rest at patch scale ms | covered | crops / run | "
        "ideal (linear in area) | ideal | measured | efficiency |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for (name, mode), s in summary.items():
        print(
            f"| {name} | {mode} | {s['dense']:.0f} | {s['fixed']:.0f} / {s['stem']:.0f} / {s['rest']:.0f} / "
            f"{s['rest_tiled']:.0f} | {100 * s['covered']:.1f} % | {100 * s['work']:.1f} / {100 * s['runs']:.1f} % | "
            f"{s['linear']:.2f}x | "
            f"{s['ideal']:.2f}x | {s['speedup']:.2f}x | {s['efficiency']:.2f} |"
        )


def final_line(summary: dict, oracle: str, learned: str, recall_delta: float, frames: str = "all") -> str:
    """``engine efficiency E (oracle Sx, ideal Ix); learned Lx at recall -R pts`` (all frames)."""
    o, lr = summary[frames, oracle], summary[frames, learned]
    return (
        f"engine efficiency {o['efficiency']:.2f} (oracle {o['speedup']:.2f}x, ideal {o['ideal']:.2f}x); "
        f"learned {lr['speedup']:.2f}x at recall {recall_delta:+.1f} pts"
    )


def coverage(patches, gt: np.ndarray, scale: float, pad: tuple[float, float], cell: int, min_size: float = 4.0):
    """(covered, total) GT objects >= ``min_size`` whose centre (in letterboxed-input pixels) is in a patch core.

    ``cell`` is the heatmap cell in input pixels (``SparseModel.cell``), the unit of the patches' coordinates.
    """
    gt = gt[((gt[:, 3] - gt[:, 1]) >= min_size) & ((gt[:, 4] - gt[:, 2]) >= min_size)]
    cx = (gt[:, 1] + gt[:, 3]) / 2 * scale + pad[0]
    cy = (gt[:, 2] + gt[:, 4]) / 2 * scale + pad[1]
    inside = np.zeros(len(gt), bool)
    for p in patches:
        y0, x0, y1, x1 = (v * cell for v in p.core)
        inside |= (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    return int(inside.sum()), len(gt)


def letterbox_geometry(h, w, hw):
    r = min(hw[0] / h, hw[1] / w)
    return r, ((hw[1] - round(w * r)) / 2, (hw[0] - round(h * r)) / 2)


def oracle_heatmap(gts, cell: int):
    """``heat(n, image_hw, input_hw, cells)``: the ground-truth heatmap of frame ``n`` on ``cell``-px cells."""
    from so_det_ultra.losses.esod import heatmap_target

    def heat(n, image_hw, hw, cells):
        objs, _ = gts[n]
        r, (px, py) = letterbox_geometry(*image_hw, hw)
        b = torch.as_tensor(objs[:, 1:]) * r + torch.tensor([px, py, px, py])
        return heatmap_target(b, cells, cell)[0]

    return heat
