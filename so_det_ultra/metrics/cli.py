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
    from so_det_ultra.metrics.coco import evaluate_dataset, load_predictions, protocol_from_data

    try:
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
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result.as_dict(), indent=2))
        print(f"wrote {a.json}")
    if a.plot:
        from so_det_ultra.metrics.plots import plot_ap

        print(f"wrote {plot_ap(result, a.plot)}")
    return 0
