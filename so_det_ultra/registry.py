"""One registry for every so-det-ultra layer, and the channel rules that tell a model parser how to build it.

Each layer declares itself next to its class (OpenMMLab/timm style)::

    @register_block(channels=channels.scaled)
    class CDown(nn.Module): ...

A *channel rule* is a function ``rule(spec: LayerSpec) -> (c2, args, n)``: given one YAML row and the channels of the
layers built so far, it returns the block's output channels, the constructor arguments and the repeat count. The
integration layer (``so_det_ultra.integration``) calls the rule from Ultralytics' ``parse_model``; blocks never see the
parser, and this module never imports Ultralytics or torch.
"""

from __future__ import annotations

import difflib
import math
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
        model scale in use. name (str): the module name as written in the YAML. yaml (dict): the whole model
        dict (``nc``, ``reg_max``, ``end2end``, ...). legacy (bool): Ultralytics' head-style flag at this row (False
        once a YOLO11-era block such as C3k2 has been seen); heads that subclass ``Detect`` need it.
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


class Registry:
    """Name -> class table with channel rules; duplicate and unknown names raise errors that say what to do."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._subscribers: list[Callable[[Entry], None]] = []

    def register(self, cls: type | None = None, *, name: str | None = None, channels: Callable | None = None):
        """Register ``cls`` (usable as ``@register`` or ``@register(channels=rule)``).

        Args:
            cls: The class; omitted when used as a decorator factory.
            name: YAML name; defaults to the class name.
            channels: Channel rule (see module docstring); ``None`` for classes that are not YAML layers (losses,
                models) and are registered only so checkpoints that contain them load under safe loading.
        """

        def add(c):
            key = name or c.__name__
            old = self._entries.get(key)
            if old is not None and old.cls is not c:
                raise KeyError(f"{self.kind} '{key}' is already registered by {old.origin}; pick another name")
            entry = Entry(key, c, channels)
            self._entries[key] = entry
            for fn in self._subscribers:
                fn(entry)
            return c

        return add(cls) if cls is not None else add

    def subscribe(self, fn: Callable[[Entry], None]):
        """Call ``fn(entry)`` for every entry now and for every entry registered later."""
        self._subscribers.append(fn)
        for entry in list(self._entries.values()):
            fn(entry)

    def unsubscribe(self, fn: Callable[[Entry], None]):
        """Stop calling ``fn`` for new entries (no-op if it is not subscribed)."""
        self._subscribers[:] = [f for f in self._subscribers if f is not fn]

    def __contains__(self, key) -> bool:
        return key in self._entries

    def names(self, layers_only: bool = True) -> list:
        return sorted(k for k, e in self._entries.items() if e.channels is not None or not layers_only)

    def get(self, key: str) -> Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise UnknownBlockError(self.unknown_message(key)) from None

    def find_class(self, cls) -> Entry | None:
        """The entry of ``cls`` if it is a registered YAML layer, else None."""
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


BLOCKS = Registry("block")
LOSSES = Registry("loss")


def register_block(cls=None, *, name=None, channels=None):
    """Register a layer (or, with ``channels=None``, a non-layer class such as a loss) in :data:`BLOCKS`."""
    return BLOCKS.register(cls, name=name, channels=channels)


def register_loss(cls=None, *, name=None):
    """Register a training criterion selectable from a model YAML's ``loss:`` section (see integration.losses)."""
    return LOSSES.register(cls, name=name, channels=None)
