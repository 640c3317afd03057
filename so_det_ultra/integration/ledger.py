"""The patch ledger: every change so-det-ultra makes to Ultralytics (and torch), recorded with what undoes it.

Each change goes through one :class:`Ledger` method, which makes it and records a :class:`Change`:

- :meth:`Ledger.rebind`: a module function (rebound in every loaded ``ultralytics.*`` module holding the original,
  because Ultralytics imports some of them by value);
- :meth:`Ledger.set_class_attr`: a method on a class;
- :meth:`Ledger.add_global`: a name added to a module's globals;
- :meth:`Ledger.append`: a function appended to a list (Ultralytics' default callbacks; the subscribers of
  :data:`so_det_ultra.registry.SAFE_GLOBALS`);
- :meth:`Ledger.add_safe_global`: a class on torch's weights-only allow-list.

:meth:`Ledger.undo` reverts them all, newest first, restoring the very objects that were there before.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

ABSENT = type("Absent", (), {"__repr__": lambda self: "<absent>"})()  # `original` of something that was added


@dataclass(frozen=True)
class Change:
    """One recorded change.

    Attributes:
        kind (str): ``function``, ``class attribute``, ``global``, ``callback`` or ``safe global``.
        target (str): What was changed, e.g. ``ultralytics.nn.tasks.parse_model``.
        original (Any): The object that was there before (:data:`ABSENT` for additions).
        new (Any): The object put there.
        undo (Callable[[], None]): Restores ``original``.
    """

    kind: str
    target: str
    original: Any
    new: Any
    undo: Callable[[], None]


class Ledger(Mapping):
    """Ordered ``target -> Change`` record of the changes made through it (read-only as a mapping)."""

    def __init__(self):
        self._changes: dict[str, Change] = {}

    def __getitem__(self, target: str) -> Change:
        return self._changes[target]

    def __iter__(self):
        return iter(self._changes)

    def __len__(self) -> int:
        return len(self._changes)

    def _record(self, change: Change) -> Change:
        if change.target in self._changes:
            change.undo()
            raise RuntimeError(
                f"so-det-ultra: {change.target} is already patched; uninstall() before patching it again"
            )
        self._changes[change.target] = change
        return change

    def rebind(self, module, name: str, new) -> Change:
        """``module.name = new``, and the same in every loaded ``ultralytics.*`` module holding the original object."""
        original = getattr(module, name)
        for mod in _ultralytics_modules():
            if mod is not module and getattr(mod, name, None) is original:
                setattr(mod, name, new)
        setattr(module, name, new)

        def undo():  # also modules imported after the patch that took `new` by value
            for mod in [module, *_ultralytics_modules()]:
                if getattr(mod, name, None) is new:
                    setattr(mod, name, original)

        return self._record(Change("function", f"{module.__name__}.{name}", original, new, undo))

    def set_class_attr(self, cls: type, name: str, new) -> Change:
        """``cls.name = new`` (the class's own attribute; an inherited one is shadowed, then un-shadowed by undo)."""
        original = cls.__dict__.get(name, ABSENT)
        setattr(cls, name, new)

        def undo():
            if original is ABSENT:
                delattr(cls, name)
            else:
                setattr(cls, name, original)

        target = f"{cls.__module__}.{cls.__qualname__}.{name}"
        return self._record(Change("class attribute", target, original, new, undo))

    def add_global(self, module, name: str, value) -> Change:
        """Add ``name`` to ``module``'s globals (it must not exist yet)."""
        if hasattr(module, name):
            raise RuntimeError(f"so-det-ultra: {module.__name__}.{name} already exists; refusing to overwrite it")
        setattr(module, name, value)
        return self._record(Change("global", f"{module.__name__}.{name}", ABSENT, value, lambda: delattr(module, name)))

    def append(self, lst: list, item, target: str) -> Change:
        """Append ``item`` to ``lst``; ``target`` names the list entry, e.g. ``...default_callbacks[on_val_end]``."""
        lst.append(item)

        def undo():
            lst[:] = [x for x in lst if x is not item]

        name = f"{getattr(item, '__module__', '?')}.{getattr(item, '__qualname__', repr(item))}"
        return self._record(Change("callback", f"{target} += {name}", ABSENT, item, undo))

    def add_safe_global(self, obj) -> Change | None:
        """Put ``obj`` on torch's weights-only allow-list (``torch.serialization.add_safe_globals``) if not there."""
        import torch.serialization as ts

        if obj in ts.get_safe_globals():
            return None

        def undo():
            keep = [g for g in ts.get_safe_globals() if g is not obj]
            ts.clear_safe_globals()
            ts.add_safe_globals(keep)

        ts.add_safe_globals([obj])
        target = f"torch.serialization safe globals += {obj.__module__}.{obj.__qualname__}"
        return self._record(Change("safe global", target, ABSENT, obj, undo))

    def undo(self):
        """Revert every recorded change, newest first, and forget them."""
        for change in reversed(list(self._changes.values())):
            change.undo()
        self._changes.clear()


def _ultralytics_modules() -> list:
    return [m for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("ultralytics")]
