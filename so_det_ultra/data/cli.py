"""``so-det synthetic`` and ``so-det convert {visdrone,soda-d}``: dataset commands (docs/datasets.md).

- ``so-det synthetic ROOT``: a synthetic tiny-object dataset (:func:`so_det_ultra.data.synthetic.make_dataset`).
- ``so-det convert visdrone SRC DST`` / ``so-det convert soda-d SRC DST``: official annotations -> YOLO labels plus
  sidecars (:func:`~so_det_ultra.data.visdrone.convert_visdrone`, :func:`~so_det_ultra.data.soda.convert_soda`).

Option defaults are those of the functions' signatures (:mod:`so_det_ultra.cliargs`). Importing this module costs
argparse only; the converters are imported when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from so_det_ultra.cliargs import HelpFormatter, kwargs_for, option
from so_det_ultra.data._io import IMAGE_MODES, os_error_text  # standard library only


def _synthetic():
    from so_det_ultra.data.synthetic import make_dataset

    return make_dataset


def _visdrone():
    from so_det_ultra.data.visdrone import convert_visdrone

    return convert_visdrone


def _soda():
    from so_det_ultra.data.soda import convert_soda

    return convert_soda


def add_parser(sub) -> None:
    """Add ``synthetic`` and ``convert`` to the ``so-det`` sub-parsers ``sub``."""
    _add_synthetic(sub)
    _add_convert(sub)


def _add_synthetic(sub):
    p = sub.add_parser(
        "synthetic", help="write a synthetic tiny-object dataset in YOLO layout", formatter_class=HelpFormatter
    )
    p.add_argument("root", help="output folder (images/, labels/, data.yaml)")
    option(p, "--train", dest="n_train", metavar="N", type=int, help="training images", defaults_from=_synthetic)
    option(p, "--val", dest="n_val", metavar="N", type=int, help="validation images", defaults_from=_synthetic)
    option(p, "--imgsz", type=int, help="square image side in pixels", defaults_from=_synthetic)
    option(p, "--nc", type=int, help="classes (1-6)", defaults_from=_synthetic)
    option(
        p, "--objects", type=int, nargs=2, metavar=("MIN", "MAX"), help="objects per image", defaults_from=_synthetic
    )
    option(
        p,
        "--sizes",
        dest="size_range",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="object side, px",
        defaults_from=_synthetic,
    )
    option(p, "--seed", type=int, help="random seed", defaults_from=_synthetic)
    _ownership_options(
        p, _synthetic, "write into a non-empty ROOT that no so-det synthetic wrote (only its files are replaced)"
    )
    p.set_defaults(func=run_synthetic)


def _ownership_options(p, target, force_help: str) -> None:
    """``--force`` and ``--lock-timeout``: the options of every command that owns its output folder."""
    option(p, "--force", action="store_true", help=force_help, defaults_from=target)
    option(
        p,
        "--lock-timeout",
        type=float,
        metavar="S",
        help="give up after S seconds when another run is writing the folder (default: wait)",
        defaults_from=target,
    )


def _common(p, target):
    p.add_argument("src", help="folder holding the official folders or .zip archives (never modified)")
    p.add_argument("dst", help="output dataset root: images/, labels/, sidecars/, data.yaml")
    option(
        p,
        "--mask-ignored",
        action=argparse.BooleanOptionalAction,
        help="fill ignored regions in the converted images (VisDrone: --mask-style; SODA-D: --ignore-fill)",
        defaults_from=target,
    )
    option(
        p,
        "--images",
        choices=IMAGE_MODES,
        help="how unmodified images reach DST (hardlink saves space on the same disk)",
        defaults_from=target,
    )
    p.add_argument(
        "--no-progress", dest="show_progress", action="store_false", default=argparse.SUPPRESS, help="no progress bar"
    )
    _ownership_options(
        p, target, "convert into a non-empty DST that holds no conversion manifest (files it does not write are kept)"
    )


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert VisDrone2019-DET or SODA-D to YOLO labels plus sidecars")
    conv = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    v = conv.add_parser(
        "visdrone",
        help="VisDrone2019-DET native annotations -> YOLO",
        description="SRC: a folder with VisDrone2019-DET-{train,val,test-dev}/ folders or their .zip "
        "archives, or one split folder (images/ + annotations/) itself.",
        formatter_class=HelpFormatter,
    )
    _common(v, _visdrone)
    option(
        v,
        "--mask-style",
        choices=("esod", "grey"),
        help="with --mask-ignored: esod (categories 0 and 11 painted 85, as ESOD's data_prepare.py) or grey "
        "(category 0 filled 114, labelled objects' pixels kept)",
        defaults_from=_visdrone,
    )
    v.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default=argparse.SUPPRESS,
        help="convert only this split; for a single split folder, its split name in DST (default train)",
    )
    v.set_defaults(func=run_visdrone)

    s = conv.add_parser(
        "soda-d",
        help="SODA-D COCO JSON -> YOLO, training split cut into tiles",
        description="SRC: a folder with Annotations/{train,val,test}.json and Images/, or the official .zip archives.",
        formatter_class=HelpFormatter,
    )
    _common(s, _soda)
    option(s, "--splits", nargs="+", type=str, help="JSON stems to convert", defaults_from=_soda)
    option(
        s,
        "--tile-splits",
        nargs="*",
        type=str,
        help="splits cut into tiles (the others keep full images for evaluation)",
        defaults_from=_soda,
    )
    option(s, "--ignore-fill", type=int, help="fill value of ignored regions (official: 0)", defaults_from=_soda)
    option(s, "--tile", type=int, help="tile side in px (the SODA-D protocol)", defaults_from=_soda)
    option(s, "--overlap", type=int, help="tile overlap in px (the SODA-D protocol)", defaults_from=_soda)
    option(
        s,
        "--min-visible",
        type=float,
        help="keep an object cut by a tile border if more than this fraction of its area is in the tile; "
        "otherwise its visible part becomes an ignored region of the tile",
        defaults_from=_soda,
    )
    option(s, "--keep-empty", action="store_true", help="also write tiles without objects", defaults_from=_soda)
    s.set_defaults(func=run_soda)


def run_synthetic(a) -> int:
    fn = _synthetic()
    try:
        print(fn(**kwargs_for(fn, a)))
    except ValueError as err:
        print(f"so-det synthetic: error: {err}", file=sys.stderr)
        return 2
    return 0


def run_visdrone(a) -> int:
    return _convert(_visdrone(), a)


def run_soda(a) -> int:
    return _convert(_soda(), a)


def _convert(fn, a) -> int:
    """Run a conversion and print its summary; a refused DST, a missing source or a bad option prints its message and
    exits 2, another OS error (permissions, full disk) exits 1 with the path it concerns."""
    try:
        summary = fn(**kwargs_for(fn, a, verbose=False))
    except (FileNotFoundError, ValueError) as err:
        text = os_error_text(err) if isinstance(err, OSError) else str(err)
        print(f"so-det convert: error: {text}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"so-det convert: error: {os_error_text(err)}", file=sys.stderr)
        return 1
    print(summary.format())
    print(f"data YAML: {Path(a.dst).resolve() / 'data.yaml'}")
    return 0
