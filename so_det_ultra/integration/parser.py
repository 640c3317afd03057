"""The one change to Ultralytics' model parser: ``parse_model`` learns about registered so-det-ultra blocks.

``parse_model`` (ultralytics/nn/tasks.py) looks a YAML module name up with ``globals()[m]`` and computes channels only
for layers it knows; anything else falls through to ``else: c2 = ch[f]`` with its arguments unscaled. We recompile
that function from its own source (real file name and line numbers, so tracebacks point at Ultralytics' file) with
two edits, each anchored on one exact expression and failing loudly if the anchor is missing:

1. ``globals()[m]``  ->  ``_so_det_ultra_parse.lookup(m, i, globals())``: Ultralytics' names first, then the block
   registry; an unknown name raises an error naming the layer and listing the registered blocks.
2. the final ``else: c2 = ch[f]``  ->  ``c2, args, n = _so_det_ultra_parse.channels(...)``: registered blocks get their
   own channel rule; every other module keeps exactly ``c2 = ch[f]``.

A thin Python wrapper adds the ``c3k_scales`` model-YAML key (see :func:`apply_c3k_scales`). Nothing of Ultralytics is
copied: the source is read from the installed package at run time.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import textwrap

from so_det_ultra.integration.yaml_checks import check_yaml
from so_det_ultra.registry import BLOCKS, LayerSpec, ModelBuildError, UnknownBlockError

HOOK_NAME = "_so_det_ultra_parse"  # the single name this module adds to ultralytics.nn.tasks' globals
SCALE_KEY = "_so_det_ultra_scale"  # the true scale letter, kept in parse_model's copy of the dict by apply_c3k_scales


class ParseHooks:
    """What the recompiled ``parse_model`` calls."""

    @staticmethod
    def lookup(name, i, namespace):
        if name in namespace:
            return namespace[name]  # Ultralytics' own name always wins
        if name in BLOCKS:  # the registry imports the block families on its first lookup
            return BLOCKS.get(name).cls
        raise UnknownBlockError(f"model YAML layer {i}: {BLOCKS.unknown_message(name)}")

    @staticmethod
    def channels(m, *, i, f, n, args, ch, width, max_channels, scale, d, legacy):
        entry = BLOCKS.find_class(m)
        if entry is None:
            return ch[f], args, n  # stock behaviour for every non-plugin module
        scale = d.get(SCALE_KEY, scale)  # the letter the YAML names, not apply_c3k_scales' alias
        spec = LayerSpec(i, f, n, list(args), ch, width, max_channels, scale, entry.name, d, legacy)
        try:
            return entry.channels(spec)
        except (ModelBuildError, UnknownBlockError):
            raise
        except Exception as err:  # a rule's stray IndexError/TypeError/ZeroDivisionError... becomes the package's error
            raise ModelBuildError(f"model YAML layer {i} ({entry.name}, from={f}, args={args}): {err}") from err


def _is_globals_subscript(node):
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "globals"
        and isinstance(node.slice, ast.Name)
        and node.slice.id == "m"
    )


def _is_fallback(stmts):
    """``c2 = ch[f]`` as the whole body."""
    return len(stmts) == 1 and ast.unparse(stmts[0]).replace(" ", "") == "c2=ch[f]"


class _Edit(ast.NodeTransformer):
    def __init__(self):
        self.lookups = self.fallbacks = 0

    def visit_Subscript(self, node):
        self.generic_visit(node)
        if not _is_globals_subscript(node):
            return node
        self.lookups += 1
        call = ast.parse(f"{HOOK_NAME}.lookup(m, i, globals())", mode="eval").body
        return ast.copy_location(call, node)

    def visit_If(self, node):
        self.generic_visit(node)
        if _is_fallback(node.orelse):
            self.fallbacks += 1
            new = ast.parse(
                f"c2, args, n = {HOOK_NAME}.channels(m, i=i, f=f, n=n, args=args, ch=ch, width=width, "
                "max_channels=max_channels, scale=scale, d=d, legacy=legacy)"
            ).body
            node.orelse = [ast.copy_location(s, node.orelse[0]) for s in new]
        return node


def build_parse_model(original, module):
    """Recompile ``original`` (Ultralytics' parse_model) with the two edits; raise RuntimeError if an anchor is off."""
    lines, first = inspect.getsourcelines(original)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, first - 1)
    fn = tree.body[0]
    assigned = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    missing = (
        {"width", "max_channels", "scale", "ch", "args", "n", "i", "f", "m", "legacy", "d"}
        - assigned
        - {a.arg for a in fn.args.args}
    )
    edit = _Edit()
    edit.visit(fn)
    if edit.lookups != 1 or edit.fallbacks != 1 or missing:
        raise RuntimeError(
            f"so-det-ultra cannot patch {module.__name__}.parse_model: expected one `globals()[m]` and one "
            f"`else: c2 = ch[f]`, found {edit.lookups} and {edit.fallbacks}; missing variables {sorted(missing)}. "
            "This Ultralytics version is not supported."
        )
    fn.decorator_list = []
    ast.fix_missing_locations(tree)
    namespace = {}
    exec(compile(tree, inspect.getsourcefile(original), "exec"), module.__dict__, namespace)
    patched = namespace[original.__name__]
    functools.update_wrapper(patched, original)
    return patched


def apply_c3k_scales(d: dict) -> dict:
    """Honour a model YAML's ``c3k_scales`` key (so-det-ultra extension); return the dict to hand to parse_model.

    Ultralytics forces ``c3k=True`` in every C3k2 for scales named m, l or x, whatever the YAML says. A model whose
    scales do not follow YOLO11's letters (SO-Det's m is YOLO11-s) lists the scales that should use C3k instead, e.g.
    ``c3k_scales: [l, x]``: for those, every C3k2 gets c3k=True; for the others the YAML's own flags stand.
    """
    wanted = d.get("c3k_scales")
    scale = d.get("scale") or next(iter(d.get("scales") or {}), "")
    if wanted is None or not scale:
        return d
    d = copy.deepcopy(d)
    if scale in (d.get("scales") or {}):
        alias = f"{scale}*"  # not a letter Ultralytics special-cases; channel rules see the true one (SCALE_KEY)
        d["scales"] = {**d["scales"], alias: d["scales"][scale]}
        d["scale"], d[SCALE_KEY] = alias, scale
    if scale in wanted:
        for row in d.get("backbone", []) + d.get("head", []):
            if row[2] == "C3k2":
                row[3] = [*row[3][:1], True, *row[3][2:]] if len(row[3]) >= 1 else row[3]
    return d


def check_scale(d: dict) -> None:
    """Raise :class:`ModelBuildError` naming the available scales when ``d['scale']`` is not one of ``d['scales']``.

    Ultralytics would stop with a bare ``KeyError`` (e.g. ``so-det-p-n.yaml`` where the YAML has s, m and l only).
    """
    scales, scale = d.get("scales"), d.get("scale")
    if not scales or not scale or scale in scales:
        return
    where = d.get("yaml_file") or "the model YAML"
    raise ModelBuildError(
        f"{where} has no scale '{scale}'; its scales are {', '.join(map(str, scales))}. Pick one with the file name "
        f"(e.g. '<name>-{next(iter(scales))}.yaml') or the YAML's 'scale:' key."
    )


def _failed_layer(err: BaseException, code) -> str:
    """``model YAML layer i (Module, from=f, args=[...])`` for the ``parse_model`` frame (``code``) that raised."""
    tb, frame = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code is code:
            frame = tb.tb_frame
        tb = tb.tb_next
    local = frame.f_locals if frame is not None else {}
    if "i" not in local:
        return "model YAML"
    d, i = local.get("d"), local["i"]
    rows = (d.get("backbone") or []) + (d.get("head") or []) if isinstance(d, dict) else []
    row = rows[i] if i < len(rows) else None
    if not isinstance(row, (list, tuple)) or len(row) != 4:
        return f"model YAML layer {i} (row {row!r}; expected [from, repeats, module, args])"
    f, _, name, args = row
    return f"model YAML layer {i} ({name}, from={f}, args={args})"


def wrap_parse_model(parse):
    """``parse`` with the ``c3k_scales`` key, a clear error for a missing scale, and every stray exception of a layer
    (bare ``IndexError``, ``TypeError``, ``ZeroDivisionError``, torch's ``RuntimeError`` ...) re-raised as
    :class:`ModelBuildError` naming the layer index, module, ``from`` and arguments (the original chained)."""

    @functools.wraps(parse)
    def parse_model(d, ch, verbose=True):
        check_scale(d)
        check_yaml(d, parse.__globals__)  # empty sections; plugin YAMLs: a plain nn.<Name>(...) activation
        try:
            return parse(apply_c3k_scales(d), ch, verbose)
        except (ModelBuildError, UnknownBlockError):
            raise
        except Exception as err:
            raise ModelBuildError(f"{_failed_layer(err, parse.__code__)}: {type(err).__name__}: {err}") from err

    return parse_model


def install(ledger):
    """Add the hook global to ``ultralytics.nn.tasks`` and rebind its ``parse_model`` to the recompiled one."""
    import ultralytics.nn.tasks as tasks

    ledger.add_global(tasks, HOOK_NAME, ParseHooks)
    ledger.rebind(tasks, "parse_model", wrap_parse_model(build_parse_model(tasks.parse_model, tasks)))
