"""argparse helpers for the ``so-det`` command modules: option defaults come from the functions' signatures.

A command option that feeds a library function keeps no default of its own: it is declared with :func:`option`,
which sets ``default=argparse.SUPPRESS`` (an option not given is absent from the parsed namespace) and records which
function(s) the value goes to. :func:`kwargs_for` then passes only the options the user gave, so the function's own
defaults apply, and :class:`HelpFormatter` shows those defaults in ``--help`` by reading the signatures when help is
printed -- not when the parser is built, so building it imports nothing heavy (``so-det --help`` stays fast).
Standard library only.

Examples:
    >>> p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    >>> def fn(x, tile=640):
    ...     return tile
    >>> option(p, "--tile", type=int, help="tile side", defaults_from=lambda: fn)  # doctest: +ELLIPSIS
    _StoreAction(...)
    >>> fn(1, **kwargs_for(fn, p.parse_args([])))
    640
"""

from __future__ import annotations

import argparse
import inspect


def defaults(fn) -> dict:
    """``{parameter: default}`` for the parameters of ``fn`` that have one."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def option(parser, *flags, defaults_from, **kwargs):
    """``parser.add_argument(*flags, **kwargs)`` whose default is the one of the target function's parameter ``dest``.

    Args:
        parser: An ``argparse`` parser or argument group.
        *flags: Option strings, e.g. ``"--iou"``.
        defaults_from: Zero-argument callable returning the target function, or a dict ``{label: function}`` when
            the option feeds several (help then lists each default with its label). Called only to print help.
        **kwargs: Passed to ``add_argument`` (``default`` is not allowed: it lives in the signature).
    """
    if "default" in kwargs:
        raise TypeError("option(): the default lives in the target function's signature, not in the parser")
    action = parser.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)
    action.defaults_from = defaults_from
    return action


def kwargs_for(fn, args: argparse.Namespace, **extra) -> dict:
    """The parsed options (plus ``extra``) that are parameters of ``fn``; options not given are left out."""
    params = inspect.signature(fn).parameters
    given = {**vars(args), **extra}
    return {k: v for k, v in given.items() if k in params}


def unsafe_load_option(parser, what: str = "the checkpoint", **kwargs):
    """``--unsafe-load``, one wording for every command that reads a checkpoint (``kwargs`` go to ``add_argument``)."""
    return parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help=f"read {what} with full pickle instead of the safe (weights-only) reader: it can run code stored in the "
        "file, so only for files you trust",
        **kwargs,
    )


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v)) if v else "none"
    return str(v)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to options declared with :func:`option`, read from the target signatures."""

    def _get_help_string(self, action):
        text = action.help or ""
        source = getattr(action, "defaults_from", None)
        if source is None or "default:" in text:
            return text
        targets = source() if not isinstance(source, dict) else {k: f() for k, f in source.items()}
        if callable(targets):
            value = defaults(targets).get(action.dest)
            shown = "" if value is None else _show(value)
        else:
            values = {k: _show(defaults(f)[action.dest]) for k, f in targets.items()}
            same = len(set(values.values())) == 1
            shown = next(iter(values.values())) if same else ", ".join(f"{k} {v}" for k, v in values.items())
        return f"{text} (default: {shown})" if shown else text
