"""Safe (weights-only) checkpoint loading: every registered so-det-ultra class goes on torch's allow-list."""

from __future__ import annotations

from so_det_ultra.registry import BLOCKS, LOSSES

_subscriber = {"fn": None}  # the registry subscription of the current install(), removed by uninstall()


def install(ledger):
    """Allow-list registered classes now and any registered later (losses register when a ``loss:`` is first built)."""
    import so_det_ultra.nn  # noqa: F401  (registers every block family)

    def allow(entry):
        ledger.add_safe_global(entry.cls)

    _subscriber["fn"] = allow
    BLOCKS.subscribe(allow)
    LOSSES.subscribe(allow)


def uninstall():
    """Stop allow-listing newly registered classes (the ledger removes the ones already added)."""
    fn, _subscriber["fn"] = _subscriber["fn"], None
    if fn is not None:
        BLOCKS.unsubscribe(fn)
        LOSSES.unsubscribe(fn)
