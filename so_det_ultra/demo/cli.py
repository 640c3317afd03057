"""``so-det demo [--out DIR]``: run :func:`so_det_ultra.demo.pipeline.run_demo` (docs/demo.md).

Importing this module costs argparse only; torch and Ultralytics load when the command runs.
"""

from __future__ import annotations

import os
import sys

from so_det_ultra.cliargs import HelpFormatter, kwargs_for, option


def _run_demo():
    from so_det_ultra.demo.pipeline import run_demo

    return run_demo


def add_parser(sub) -> None:
    """Add ``demo`` to the ``so-det`` sub-parsers ``sub``."""
    p = sub.add_parser(
        "demo",
        help="train, validate, predict and export on a synthetic tiny-object set (offline, 1-3 min on CPU)",
        description="Runs the whole job on generated data and prints where the results are. Nothing is downloaded.",
        formatter_class=HelpFormatter,
    )
    option(
        p, "--out", metavar="DIR", help="output folder (default: a fresh ./so-det-demo[-N])", defaults_from=_run_demo
    )
    option(p, "--exist-ok", action="store_true", help="write into a non-empty --out folder", defaults_from=_run_demo)
    option(p, "--epochs", type=int, help="training epochs", defaults_from=_run_demo)
    option(p, "--imgsz", type=int, help="image side in pixels (data and training)", defaults_from=_run_demo)
    option(
        p, "--images", type=int, help="training images (validation gets a sixth, at least 4)", defaults_from=_run_demo
    )
    option(p, "--batch", type=int, help="batch size", defaults_from=_run_demo)
    option(p, "--device", help="torch device", defaults_from=_run_demo)
    option(p, "--seed", type=int, help="random seed of data and training", defaults_from=_run_demo)
    option(
        p, "--onnx-tol", type=float, help="largest ONNX vs PyTorch output difference allowed", defaults_from=_run_demo
    )
    p.set_defaults(func=run)


def run(a) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics is imported: no version checks, no telemetry
    from so_det_ultra.demo.pipeline import DemoError

    fn = _run_demo()
    try:
        fn(**kwargs_for(fn, a))
    except DemoError as err:
        print(f"so-det demo: error: {err}", file=sys.stderr)
        return 2 if err.usage else 1
    return 0
