"""Safe (weights-only) checkpoint loading: every class of :data:`so_det_ultra.registry.SAFE_GLOBALS` goes on torch's
allow-list, now and whenever one is registered later (losses register when a ``loss:`` is first built).

Both steps are ledger changes, so ``uninstall()`` undoes them with everything else: the subscription to the allow-list
(a ``callback`` appended to ``SAFE_GLOBALS.subscribers``) and each class put on torch's list (a ``safe global``).
"""

from __future__ import annotations

from so_det_ultra.registry import SAFE_GLOBALS


def install(ledger):
    """Allow-list the registered classes now and any registered later."""

    def allow(cls):
        ledger.add_safe_global(cls)

    ledger.append(SAFE_GLOBALS.subscribers, allow, "so_det_ultra.registry.SAFE_GLOBALS.subscribers")
    for cls in SAFE_GLOBALS.classes():  # imports the block families on first use
        allow(cls)
