"""``so-det fit-seeker --model best.pt --data DATA.yaml --out fitted.pt``: sparse inference for a trained detector.

Fits ESOD's object seeker onto the frozen model (inserted after its stride-8 backbone output, or the model's own
re-fitted) and stores the heatmap threshold chosen from held-out recall; the same as
:func:`so_det_ultra.training.seeker.fit_seeker`, whose signature gives the defaults. docs/highres.md, "Sparse
inference for a model you already trained".
"""

from __future__ import annotations

import argparse
import sys

from so_det_ultra.cliargs import HelpFormatter, kwargs_for, option, unsafe_load_option
from so_det_ultra.data._io import os_error_text


def _fit():
    from so_det_ultra.training.seeker import fit_seeker

    return fit_seeker


def add_parser(sub) -> None:
    """Add ``fit-seeker`` to the ``so-det`` sub-parsers ``sub``."""
    p = sub.add_parser(
        "fit-seeker",
        help="fit an ESOD object seeker onto a trained detector, for sparse inference",
        description="Inserts an ObjectSeeker after the stride-8 backbone output of a trained detection checkpoint "
        "(so-det-esod: re-fits its own), trains only the seeker on the frozen model's features, chooses the heatmap "
        "threshold that keeps --recall of held-out objects in the selected patches, and writes a checkpoint whose "
        "dense predictions equal the input's. Then: so-det predict --mode sparse --model OUT.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="trained Ultralytics detection checkpoint (.pt)")
    p.add_argument("--data", required=True, help="data YAML (so-det convert output or any yolo train data)")
    option(p, "--out", help="checkpoint to write (default: <model stem>-seeker.pt beside --model)", defaults_from=_fit)
    option(p, "--epochs", type=int, help="passes over the training frames", defaults_from=_fit)
    option(p, "--variants", type=int, help="feature copies per frame: as is, flipped, rescaled", defaults_from=_fit)
    option(p, "--scale", type=float, help="copies resized by a factor in [1-scale, 1+scale]", defaults_from=_fit)
    option(p, "--imgsz", type=int, help="long side of the input (default: each frame's own)", defaults_from=_fit)
    option(p, "--layer", type=int, help="layer the inserted seeker reads (default: last stride-8 backbone layer)",
           defaults_from=_fit)  # fmt: skip
    option(p, "--cache", help="stride-8 features: ram, a folder (kept for later fits) or none", defaults_from=_fit)
    p.add_argument("--device", default=argparse.SUPPRESS, help="torch device (default: cuda:0 if available, else cpu)")
    option(p, "--recall", type=float, help="held-out seeker recall the chosen threshold keeps", defaults_from=_fit)
    option(p, "--recall-of", choices=("objects", "detections"), help="objects: all ground truth; detections: the "
           "ground truth the dense model finds (one dense pass per held-out frame)", defaults_from=_fit)  # fmt: skip
    option(p, "--det-conf", type=float, help="--recall-of detections: confidence of a detection", defaults_from=_fit)
    option(p, "--thr", type=float, help="store this heatmap threshold instead of choosing one", defaults_from=_fit)
    option(p, "--holdout", type=float, help="share of the frames held out for recall", defaults_from=_fit)
    option(p, "--split", help="split of --data to fit on", defaults_from=_fit)
    option(p, "--fraction", type=float, help="share of the split to use", defaults_from=_fit)
    option(p, "--lr", type=float, help="AdamW learning rate (cosine decay)", defaults_from=_fit)
    option(p, "--weights", choices=("official", "none"), help="ESOD per-cell heatmap weights", defaults_from=_fit)
    option(p, "--frame-area", type=float, help="original-frame area for the weights (px; default: image's own)",
           defaults_from=_fit)  # fmt: skip
    option(p, "--min-size", type=float, help="objects smaller (px) do not count towards recall", defaults_from=_fit)
    option(p, "--patch", type=int, help="patch side (cells) for recall (default: ESOD's w/8 x h/8)", defaults_from=_fit)
    p.add_argument("--no-prune", dest="prune", action="store_false", default=argparse.SUPPRESS,
                   help="recall without patch pruning (as sparse_predict(prune=False))")  # fmt: skip
    option(p, "--seed", type=int, help="seed of augmentation and order", defaults_from=_fit)
    p.add_argument("--force", action="store_true", default=argparse.SUPPRESS, help="replace an existing --out")
    unsafe_load_option(p, "--model", default=argparse.SUPPRESS)
    p.set_defaults(func=_run)


def _run(a) -> int:
    fit = _fit()
    try:
        out = fit(**kwargs_for(fit, a))
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"so-det fit-seeker: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder without write permission: the path and nothing written
        out = getattr(a, "out", None) or "the checkpoint"
        print(f"so-det fit-seeker: {os_error_text(e)}; {out} was not written", file=sys.stderr)
        return 1
    print(out)
    return 0
