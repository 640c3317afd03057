"""The ``so-det`` command: ``so-det <command> ...``; every command has ``--help``.

Each package with commands has a ``cli.py`` exposing ``add_parser(subparsers)``, which adds its sub-parser(s) and
sets ``func`` (called with the parsed arguments, returning an exit code). :data:`COMMANDS` lists those modules as
objects, in the order ``so-det --help`` shows them.

Adding a command (e.g. ``so-det demo``): write ``so_det_ultra/<package>/cli.py`` with ``add_parser(subparsers)`` and
add one line to the imports below, ``from so_det_ultra.<package> import cli as <package>_cli``, naming it in
:data:`COMMANDS`. Keep command modules cheap to import -- argparse and :mod:`so_det_ultra.cliargs` at module level,
everything heavy (torch, Ultralytics, OpenCV) inside the command function -- so ``so-det --help`` stays fast and
``python -c "import so_det_ultra"`` loads no torch. Option defaults live in the library functions' signatures and
are read from there (:mod:`so_det_ultra.cliargs`).
"""

from __future__ import annotations

import argparse
import sys

from so_det_ultra.data import cli as data_cli
from so_det_ultra.demo import cli as demo_cli
from so_det_ultra.highres import cli as highres_cli
from so_det_ultra.highres import export as export_cli
from so_det_ultra.metrics import cli as metrics_cli
from so_det_ultra.training import cli as training_cli

COMMANDS = (demo_cli, data_cli, metrics_cli, highres_cli, export_cli, training_cli)  # ..., export, fit-seeker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="so-det", description="so-det-ultra: small-object detection tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    """Run one command; an OS error no command handled (permissions, full disk, a vanished file) is one line naming
    the path it concerns, exit status 1, instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OSError as err:
        from so_det_ultra.data._io import os_error_text

        print(f"so-det {args.command}: error: {os_error_text(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
