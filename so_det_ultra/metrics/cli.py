"""``so-det eval --data DATA.yaml --split val --pred predictions.json [--json OUT.json]``: size-wise APs of saved
predictions (``yolo val save_json=True``, an exported model, another framework writing the same COCO rows)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser(
        "eval",
        help="AP, AP50, AP75 and AP per object size of a predictions.json (docs/metrics.md)",
        description="Evaluates COCO-format detections (image_id = image file stem, category_id = "
        "class index + 1, bbox = [x, y, w, h] pixels, score), as written by "
        "'yolo val save_json=True', against a dataset whose data YAML has a 'so_det:' key.",
    )
    p.add_argument("--data", required=True, help="data YAML with a so_det: key (a path, or visdrone.yaml/soda-d.yaml)")
    p.add_argument("--split", default="val", help="split of the data YAML to evaluate on (default val)")
    p.add_argument("--pred", required=True, help="predictions.json")
    p.add_argument("--json", metavar="OUT.json", help="write AP, AP50, AP75, AP_<bin> (and details) to this file")
    p.add_argument("--plot", metavar="OUT.png", help="draw AP by size (and per class for VisDrone) to this file")
    p.add_argument(
        "--max-det",
        type=int,
        help="report AP at N detections per image (soda-d: per image and class); default: the protocol's "
        "(so_det.max_det, or so_det.max_dets[0] for soda-d)",
    )
    p.add_argument("--single-cls", action="store_true", help="evaluate class-agnostically (as yolo val single_cls)")
    p.set_defaults(func=run)


def run(a) -> int:
    from dataclasses import replace

    import ultralytics.nn.tasks  # noqa: F401  (registers so-det-ultra: our dataset YAMLs resolve by bare name)
    from ultralytics.data.utils import check_det_dataset

    from so_det_ultra.data.contract import SO_DET_KEY, so_det_hint
    from so_det_ultra.metrics.evaluate import evaluate_dataset
    from so_det_ultra.metrics.predictions import load_predictions
    from so_det_ultra.metrics.protocol import protocol_from_data

    try:
        json_out, plot_out = output_paths(a.json, a.plot)
        data = check_det_dataset(a.data)
        protocol = protocol_from_data(data)
        if protocol is None:
            raise ValueError(
                f"{a.data} has no '{SO_DET_KEY}:' key; add {so_det_hint()} (or eval: soda-d), see docs/metrics.md"
            )
        if a.max_det is not None:
            if a.max_det < 1:
                raise ValueError(f"--max-det must be positive, got {a.max_det}")
            protocol = replace(protocol, max_det=a.max_det, max_dets=(a.max_det,))  # AP at N, in the protocol's scope
        result = evaluate_dataset(data, a.split, load_predictions(a.pred), protocol, single_cls=a.single_cls)
    except (ValueError, FileNotFoundError) as err:
        print(f"so-det eval: error: {err}", file=sys.stderr)
        return 2
    print(result.table(per_class=True))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.as_dict(), indent=2))
        print(f"wrote {json_out}")
    if plot_out:
        from so_det_ultra.metrics.plots import plot_ap

        print(f"wrote {plot_ap(result, plot_out)}")
    return 0


PLOT_SUFFIXES = (".png", ".pdf", ".svg")  # formats matplotlib writes without extra packages


def output_paths(json_arg, plot_arg):
    """``(json, plot)`` output paths checked before anything is computed; ValueError naming the option otherwise.

    A folder (or a path under a file) is refused; a plot name without one of :data:`PLOT_SUFFIXES` gets ``.png``
    appended (what matplotlib would write), and that is the name reported.
    """
    out = []
    for flag, arg, example in (("--json", json_arg, "ap.json"), ("--plot", plot_arg, "ap.png")):
        if not arg:
            out.append(None)
            continue
        path = Path(arg)
        if path.is_dir():
            raise ValueError(f"{flag} {arg} is a folder; give a file name, e.g. {path / example}")
        if any(p.exists() and not p.is_dir() for p in path.parents):
            raise ValueError(f"{flag} {arg}: a parent of it is a file, not a folder; choose another path")
        if flag == "--plot" and path.suffix.lower() not in PLOT_SUFFIXES:
            path = path.with_name(path.name + ".png")
        out.append(path)
    return tuple(out)
