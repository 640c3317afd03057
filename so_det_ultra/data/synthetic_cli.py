"""``so-det synthetic ROOT``: write a synthetic tiny-object dataset (see :mod:`so_det_ultra.data.synthetic`)."""


def add_parser(sub):
    p = sub.add_parser("synthetic", help="write a synthetic tiny-object dataset in YOLO layout")
    p.add_argument("root", help="output folder (images/, labels/, data.yaml)")
    p.add_argument("--train", type=int, default=32, help="training images")
    p.add_argument("--val", type=int, default=16, help="validation images")
    p.add_argument("--imgsz", type=int, default=160, help="square image side in pixels")
    p.add_argument("--nc", type=int, default=3, help="classes (1-6)")
    p.add_argument("--objects", type=int, nargs=2, default=(3, 12), metavar=("MIN", "MAX"), help="objects per image")
    p.add_argument("--sizes", type=float, nargs=2, default=(4.0, 24.0), metavar=("MIN", "MAX"), help="object side, px")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(a):
    from so_det_ultra.data.synthetic import make_dataset

    print(make_dataset(a.root, a.train, a.val, a.imgsz, a.nc, tuple(a.objects), tuple(a.sizes), a.seed))
    return 0
