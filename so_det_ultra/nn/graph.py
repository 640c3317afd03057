"""Walking an Ultralytics layer list: the ``from`` rule, and the one ObjectSeeker of an ESOD model.

Ultralytics builds a model as a flat list of layers, each with ``i`` (its index) and ``f`` (the layers it reads: an
int, or a list; ``-1`` is the previous layer's output). ESOD's sparse inference and patch training both split that
list at the :class:`~so_det_ultra.nn.esod.ObjectSeeker` and run the two parts separately; these helpers are what they
share with ESODLoss's model check.
"""

from __future__ import annotations

from so_det_ultra.nn.esod import ObjectSeeker


def sources(m) -> list[int]:
    """Absolute indices of the layers ``m`` reads (a negative ``from`` counts back: -1 is the previous layer)."""
    return [m.i + j if j < 0 else j for j in ([m.f] if isinstance(m.f, int) else m.f)]


def layer_inputs(m, x, y: list):
    """The input of layer ``m`` given the previous output ``x`` and all outputs ``y`` (Ultralytics' ``from`` rule).

    The rule of ``BaseModel._predict_once`` (``ultralytics/nn/tasks.py``), for one layer.
    """
    if m.f == -1:
        return x
    return y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]


def run_layers(layers, x, y: list):
    """Run ``layers`` in order from input ``x``, appending each output to ``y`` (in place); the last output."""
    for m in layers:
        x = m(layer_inputs(m, x, y))
        y.append(x)
    return x


def seeker_index(model, needed_by: str, hint: str = "use so-det-esod-*.yaml") -> int:
    """Index of the one :class:`~so_det_ultra.nn.esod.ObjectSeeker` layer of ``model`` (a model or a layer list).

    Raises ValueError naming ``needed_by`` when the model has none or several.
    """
    layers = getattr(model, "model", model)
    found = [m.i for m in layers if isinstance(m, ObjectSeeker)]
    if len(found) != 1:
        raise ValueError(f"{needed_by} needs exactly one ObjectSeeker layer in the model, found {len(found)}; {hint}")
    return found[0]


def seeker_threshold(model) -> float | None:
    """The heatmap threshold stored on ``model``'s ObjectSeeker (:attr:`ObjectSeeker.thr`), or None."""
    layers = getattr(model, "model", model)
    thr = getattr(list(layers)[seeker_index(layers, "a stored threshold")], "thr", None)
    return None if thr is None else float(thr)


def stem_reads(layers, k: int) -> set[int]:
    """Outputs of layers ``0..k`` (the stem) that the layers after ``k`` read."""
    return {j for m in list(layers)[k + 1 :] for j in sources(m) if j <= k}
