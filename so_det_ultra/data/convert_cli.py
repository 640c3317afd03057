"""``so-det convert visdrone SRC DST`` and ``so-det convert soda-d SRC DST``: official annotations -> YOLO + sidecars.

See :mod:`so_det_ultra.data.visdrone`, :mod:`so_det_ultra.data.soda` and docs/datasets.md for the rules.
"""

from __future__ import annotations

import sys

from so_det_ultra.data._io import IMAGE_MODES


def _common(p):
    p.add_argument("src", help="folder holding the official folders or .zip archives (never modified)")
    p.add_argument("dst", help="output dataset root: images/, labels/, sidecars/, data.yaml")
    p.add_argument("--mask-ignored", action="store_true",
                   help="fill ignored regions with grey 114 in the converted images (off by default)")
    p.add_argument("--images", choices=IMAGE_MODES, default="copy",
                   help="how unmodified images reach DST (default copy; hardlink saves space on the same disk)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(sub):
    p = sub.add_parser("convert", help="convert VisDrone2019-DET or SODA-D to YOLO labels plus sidecars")
    conv = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    v = conv.add_parser("visdrone", help="VisDrone2019-DET native annotations -> YOLO",
                        description="SRC: a folder with VisDrone2019-DET-{train,val,test-dev}/ folders or their .zip "
                                    "archives, or one split folder (images/ + annotations/) itself.")
    _common(v)
    v.add_argument("--split", choices=("train", "val", "test"),
                   help="convert only this split; for a single split folder, its split name in DST (default train)")
    v.set_defaults(func=run_visdrone)

    s = conv.add_parser("soda-d", help="SODA-D COCO JSON -> YOLO, training split cut into tiles",
                        description="SRC: a folder with Annotations/{train,val,test}.json and Images/, or the "
                                    "official .zip archives.")
    _common(s)
    s.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="JSON stems to convert")
    s.add_argument("--tile-splits", nargs="*", default=["train"],
                   help="splits cut into tiles (default train; the others keep full images for evaluation)")
    s.add_argument("--tile", type=int, default=800, help="tile side in px (default 800, the SODA-D protocol)")
    s.add_argument("--overlap", type=int, default=150, help="tile overlap in px (default 150)")
    s.add_argument("--min-visible", type=float, default=0.5,
                   help="keep an object cut by a tile border if at least this fraction of its area is in the tile "
                        "(default 0.5); otherwise its visible part becomes an ignored region of the tile")
    s.add_argument("--keep-empty", action="store_true", help="also write tiles without objects")
    s.set_defaults(func=run_soda)


def run_visdrone(a):
    from so_det_ultra.data.visdrone import convert_visdrone

    return _guard(lambda: convert_visdrone(a.src, a.dst, a.split, a.mask_ignored, a.images, not a.no_progress), a.dst)


def run_soda(a):
    from so_det_ultra.data.soda import convert_soda

    return _guard(lambda: convert_soda(a.src, a.dst, tuple(a.splits), tuple(a.tile_splits), a.tile, a.overlap,
                                       a.min_visible, a.keep_empty, a.mask_ignored, a.images, not a.no_progress), a.dst)


def _guard(fn, dst) -> int:
    """Run a conversion; a missing source or bad option prints its message and exits 2 (no traceback)."""
    try:
        fn()
    except (FileNotFoundError, ValueError) as err:
        print(f"so-det convert: error: {err}", file=sys.stderr)
        return 2
    print(f"data YAML: {dst}/data.yaml")
    return 0
