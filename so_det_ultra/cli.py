"""The ``so-det`` command: ``so-det <command> ...``; every command has ``--help``.

Each command lives in its own module, which provides ``add_parser(subparsers)`` that adds one sub-parser and sets
``func`` (called with the parsed arguments, returning an exit code). Add new command modules to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("so_det_ultra.data.synthetic_cli", "so_det_ultra.data.convert_cli", "so_det_ultra.metrics.cli",
            "so_det_ultra.highres.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="so-det", description="so-det-ultra: small-object detection tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for path in COMMANDS:
        importlib.import_module(path).add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
