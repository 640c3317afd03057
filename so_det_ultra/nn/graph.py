"""Walking (and extending) an Ultralytics layer list: the ``from`` rule, the one ObjectSeeker of an ESOD model.

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


def model_stride(model) -> int:
    """The model's largest stride (32 when it has none): the grid that inputs, patches and crops line up with."""
    return int(max(model.stride.tolist())) if hasattr(model, "stride") else 32


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


def renumber_from(f, i: int, at: int):
    """Layer ``i``'s ``from`` ``f`` once a new layer is inserted at index ``at`` (``i`` is the index before that).

    Layers before ``at`` keep theirs. For the others, a source at or after ``at`` moves up by one with them, so a
    relative source (``-1``, the previous layer) still means the same layer; a relative source that now has the new
    layer in between becomes absolute (the layer right after the insertion keeps reading its old input).

    Example:
        >>> renumber_from(-1, 5, 5), renumber_from([-1, 4], 6, 5), renumber_from([-1, 8], 9, 5)
        (4, [-1, 4], [-1, 9])
    """
    if i < at:
        return f

    def one(j):
        src = i + j if j < 0 else j
        new = src + 1 if src >= at else src
        return j if j < 0 and new - (i + 1) == j else new

    return one(f) if isinstance(f, int) else [one(j) for j in f]


def insert_layer(model, module, at: int, row: list) -> None:
    """Insert ``module`` into ``model`` (an Ultralytics ``DetectionModel``) as layer ``at``, in place.

    The layers from ``at`` on move up by one and their ``from`` indices are renumbered (:func:`renumber_from`);
    ``model.save`` (the outputs ``_predict_once`` keeps) is recomputed from every layer's ``from`` as Ultralytics'
    ``parse_model`` builds it; ``row`` (``[from, repeats, module name, args]``) goes into ``model.yaml`` at the same
    place (the backbone when ``at`` falls inside it, else the head) and the later rows are renumbered alike, so the
    model rebuilds from its YAML with the same layers and state-dict keys. ``module.f`` is ``row[0]``; its sources
    must come before ``at``. Every other layer computes what it computed before.
    """
    import copy

    from torch import nn

    layers = list(model.model)
    if not 0 < at < len(layers):
        raise ValueError(f"a layer can go between layers 1 and {len(layers) - 1} (the head stays last), not at {at}")
    reads = [row[0]] if isinstance(row[0], int) else row[0]
    if any(not 0 <= j < at for j in reads):
        raise ValueError(f"the inserted layer must read layers before index {at} (absolute indices), got {row[0]}")
    for m in layers[at:]:
        m.f = renumber_from(m.f, m.i, at)
        m.i += 1
    module.i, module.f = at, row[0]
    module.type = f"{type(module).__module__}.{type(module).__qualname__}"
    module.np = sum(p.numel() for p in module.parameters())
    layers.insert(at, module)
    model.model = nn.Sequential(*layers)
    model.save = sorted(j % m.i for m in layers for j in ([m.f] if isinstance(m.f, int) else m.f) if j != -1)
    d = copy.deepcopy(model.yaml)
    rows = d["backbone"] + d["head"]
    rows = rows[:at] + [list(row)] + [[renumber_from(r[0], k, at), *r[1:]] for k, r in enumerate(rows[at:], at)]
    nb = len(d["backbone"]) + (at <= len(d["backbone"]))
    d["backbone"], d["head"] = rows[:nb], rows[nb:]
    model.yaml = d


def output_shapes(layers, imgsz: int = 256, ch: int = 3) -> list:
    """Shape of every layer's output on a blank ``imgsz`` square input, None where it is not one tensor (a head's list
    or dict). A layer's stride is ``imgsz // shape[-1]``. Runs in eval mode (BatchNorm statistics untouched) and
    restores each module's mode."""
    import torch

    layers = list(layers)
    modes = {m: m.training for layer in layers for m in layer.modules()}
    device = next(p for m in layers for p in m.parameters()).device
    y = []
    try:
        for layer in layers:
            layer.eval()
        with torch.no_grad():
            run_layers(layers, torch.zeros(1, ch, imgsz, imgsz, device=device), y)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in y]
