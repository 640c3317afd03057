"""The registries of so-det-ultra: YAML layers (:data:`BLOCKS`), criteria (:data:`LOSSES`), and the classes a
weights-only checkpoint load may rebuild (:data:`SAFE_GLOBALS`).

Each layer declares itself next to its class (OpenMMLab/timm style)::

    @register_block(channels=channels.scaled)
    class CDown(nn.Module): ...

A *channel rule* is a function ``rule(spec: LayerSpec) -> (c2, args, n)``: given one YAML row and the channels of the
layers built so far, it returns the block's output channels, the constructor arguments and the repeat count. The
integration layer calls the rule from Ultralytics' ``parse_model``; blocks never see the parser.

Every table knows the modules that fill it (its ``locations``, OpenMMLab's idea) and imports them by name on its first
lookup, so no caller imports ``so_det_ultra.nn`` just to fill the table. This module imports neither torch nor
Ultralytics nor any other so-det-ultra module at import time. More: docs/architecture.md, docs/adding-a-block.md.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable


class ModelBuildError(ValueError):
    """A model YAML row cannot be built (bad ``from``, channels or arguments); the message names the layer."""


class UnknownBlockError(KeyError):
    """A model YAML names a module that neither Ultralytics nor so-det-ultra knows."""

    def __str__(self):  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass
class LayerSpec:
    """One model-YAML row as the parser sees it, for a channel rule.

    Attributes:
        i (int): Layer index. f (int | list[int]): ``from``. n (int): repeats after depth scaling.
        args (list): YAML arguments (strings such as ``nc`` already resolved). ch (list[int]): output channels of the
        layers built so far (``ch[-1]`` is the previous layer). width (float), max_channels (float), scale (str): the
        model scale in use, as the YAML names it (``n``, ``s`` ...). name (str): the module name as written in the
        YAML. yaml (dict): the whole model dict (``nc``, ``reg_max``, ``end2end``, ...). legacy (bool): Ultralytics'
        head-style flag at this row (False once a YOLO11-era block such as C3k2 has been seen); heads that subclass
        ``Detect`` need it.
    """

    i: int
    f: int | list
    n: int
    args: list
    ch: list
    width: float = 1.0
    max_channels: float = float("inf")
    scale: str = ""
    name: str = ""
    yaml: dict = field(default_factory=dict)
    legacy: bool = True

    def fail(self, message: str):
        """Raise :class:`ModelBuildError` naming this layer."""
        raise ModelBuildError(f"model YAML layer {self.i} ({self.name}, from={self.f}): {message}")

    def c_in(self) -> int:
        """Input channels of a single-input layer."""
        if not isinstance(self.f, int):
            self.fail(f"takes one input, got from={self.f}")
        return self.ch[self.f]

    def c_ins(self) -> list:
        """Input channels of a multi-input layer, in ``from`` order."""
        if isinstance(self.f, int):
            self.fail("takes a list of inputs, e.g. from=[-1, 4]")
        return [self.ch[x] for x in self.f]

    def scale_channels(self, c: int) -> int:
        """Apply ``width`` and ``max_channels`` as Ultralytics does for its layers (rounded up to a multiple of 8).

        A result below 1 (``c``, ``width`` or ``max_channels`` zero or negative) is an error naming the layer.
        """
        c2 = int(math.ceil(min(c, self.max_channels) * self.width / 8) * 8)
        if c2 < 1:
            self.fail(
                f"output channels {c} at width {self.width:g}, max_channels {self.max_channels:g} give {c2} channels; "
                "channels, width and max_channels must be positive"
            )
        return c2


@dataclass(frozen=True)
class Entry:
    """A registered class with its channel rule and where it was defined."""

    name: str
    cls: type
    channels: Callable | None

    @property
    def origin(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


class _Lazy:
    """Imports the modules named in ``locations`` once, on the first lookup (re-entrant: a module being imported may
    itself look the table up)."""

    def __init__(self, locations=()):
        self.locations = tuple(locations)
        self._done = self._busy = False
        self._lock = threading.RLock()

    def _import_locations(self):
        if self._done:
            return
        with self._lock:  # another thread waits here until the table is full
            if self._done or self._busy:  # busy: this thread is importing them (a lookup from inside a location)
                return
            self._busy = True
            try:
                for name in self.locations:
                    importlib.import_module(name)
                self._done = True
            finally:
                self._busy = False


class AllowList(_Lazy):
    """The classes torch's weights-only unpickler may rebuild from a so-det-ultra checkpoint, in registration order.

    Filled by :data:`BLOCKS` and :data:`LOSSES` (every layer and criterion) and by :func:`register_safe_global` (the
    sub-modules that are not YAML layers). The integration puts them on torch's list and keeps them in step through
    :attr:`subscribers` (functions called with each class added later).
    """

    def __init__(self, locations=()):
        super().__init__(locations)
        self._classes: dict[str, type] = {}
        self.subscribers: list[Callable[[type], None]] = []

    def add(self, cls: type) -> type:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if self._classes.get(key) is not cls:
            self._classes[key] = cls
            for fn in list(self.subscribers):
                fn(cls)
        return cls

    def classes(self) -> list:
        """Every allowed class (the ``locations`` imported first)."""
        self._import_locations()
        return list(self._classes.values())

    def __contains__(self, cls) -> bool:
        return cls in self.classes()


class Registry(_Lazy):
    """Name -> class table with channel rules; duplicate and unknown names raise errors that say what to do.

    Args:
        kind: What the entries are (``block``, ``loss``), for messages.
        locations: Modules that register the entries; imported on the first lookup.
        allow: An :class:`AllowList` every registered class is also added to (None: none).
    """

    def __init__(self, kind: str, locations=(), allow: AllowList | None = None):
        super().__init__(locations)
        self.kind = kind
        self.allow = allow
        self._entries: dict[str, Entry] = {}

    def register(self, cls: type | None = None, *, name: str | None = None, channels: Callable | None = None):
        """Register ``cls`` (usable as ``@register`` or ``@register(channels=rule)``).

        Args:
            cls: The class; omitted when used as a decorator factory.
            name: YAML name; defaults to the class name.
            channels: Channel rule (see module docstring); ``None`` for entries that are not YAML layers (losses).
        """

        def add(c):
            key = name or c.__name__
            old = self._entries.get(key)
            if old is not None and old.cls is not c:
                raise KeyError(f"{self.kind} '{key}' is already registered by {old.origin}; pick another name")
            entry = Entry(key, c, channels)
            self._entries[key] = entry
            if self.allow is not None:
                self.allow.add(c)
            return c

        return add(cls) if cls is not None else add

    def __contains__(self, key) -> bool:
        self._import_locations()
        return key in self._entries

    def names(self, layers_only: bool = True) -> list:
        self._import_locations()
        return sorted(k for k, e in self._entries.items() if e.channels is not None or not layers_only)

    def get(self, key: str) -> Entry:
        self._import_locations()
        try:
            return self._entries[key]
        except KeyError:
            raise UnknownBlockError(self.unknown_message(key)) from None

    def find_class(self, cls) -> Entry | None:
        """The entry of ``cls`` if it is a registered YAML layer, else None."""
        self._import_locations()
        entry = self._entries.get(getattr(cls, "__name__", ""))
        return entry if entry is not None and entry.cls is cls and entry.channels is not None else None

    def unknown_message(self, key: str) -> str:
        names = self.names()
        hint = difflib.get_close_matches(key, names, n=1)
        return (
            f"unknown {self.kind} '{key}'."
            + (f" Did you mean '{hint[0]}'?" if hint else "")
            + f" Registered so-det-ultra {self.kind}s: {', '.join(names)}."
        )


# The modules that fill each table (imported by the table on its first lookup; importlib, so no import arrow runs from
# this bottom layer up to them). A new block family or loss module is added to its package's __init__.
SAFE_GLOBALS = AllowList(locations=("so_det_ultra.nn",))
BLOCKS = Registry("block", locations=("so_det_ultra.nn",), allow=SAFE_GLOBALS)
LOSSES = Registry("loss", locations=("so_det_ultra.losses",), allow=SAFE_GLOBALS)


def register_block(cls=None, *, name=None, channels=None):
    """Register a YAML layer with its channel rule in :data:`BLOCKS` (and :data:`SAFE_GLOBALS`).

    Without ``channels`` the class is not a YAML layer: it goes to :data:`SAFE_GLOBALS` only
    (:func:`register_safe_global`).
    """
    if channels is None:
        return register_safe_global(cls) if cls is not None else register_safe_global
    return BLOCKS.register(cls, name=name, channels=channels)


def register_loss(cls=None, *, name=None):
    """Register a training criterion selectable from a model YAML's ``loss:`` section (:mod:`so_det_ultra.losses`)."""
    return LOSSES.register(cls, name=name, channels=None)


def register_safe_global(cls):
    """Allow ``cls`` (a sub-module that is not a YAML layer) in weights-only checkpoint loads; usable as a decorator."""
    return SAFE_GLOBALS.add(cls)


_STRICT_YAMLS = contextvars.ContextVar("so_det_strict_yamls", default=False)


@contextmanager
def strict_yamls():
    """Inside the block every model YAML built is held to the plugin's rules (a plain ``nn.<Name>(<literal args>)``
    ``activation:``), also one that uses Ultralytics blocks only: so-det-ultra's commands build YAMLs this way."""
    token = _STRICT_YAMLS.set(True)
    try:
        yield
    finally:
        _STRICT_YAMLS.reset(token)


def yamls_strict() -> bool:
    """True inside :func:`strict_yamls`."""
    return _STRICT_YAMLS.get()
