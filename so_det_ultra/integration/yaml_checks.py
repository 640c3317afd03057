"""Checks a model YAML goes through before Ultralytics' ``parse_model`` builds it (called by :mod:`.parser`).

- :func:`check_sections`: a ``backbone:`` or ``head:`` key that is present must be a non-empty list of layer rows (an
  empty ``head:`` would otherwise stop with Python's bare "can only concatenate list (not "NoneType") to list"); a
  YAML that would build is not affected.
- :func:`check_activation`: Ultralytics runs a YAML's ``activation:`` string through ``eval`` (``parse_model`` in
  ultralytics/nn/tasks.py: ``Conv.default_act = eval(act)`` unless ``ULTRALYTICS_SAFE_LOAD`` is set), so a YAML
  could run any code. For a YAML that uses so-det-ultra blocks (:func:`is_plugin_yaml`), only a plain
  ``nn.<Name>(<literal arguments>)`` naming a ``torch.nn`` module class is accepted (``torch.nn.<Name>`` too), the
  shape Ultralytics' own restricted loader accepts (``_SafeLoad.activation``). A YAML without plugin blocks is left
  exactly as Ultralytics treats it, except inside :func:`so_det_ultra.registry.strict_yamls`: so-det-ultra's own
  commands (``so-det predict``, ``so-det export``) build every YAML there, so the rule holds for every YAML they
  build.
"""

from __future__ import annotations

import ast

from so_det_ultra.registry import BLOCKS, ModelBuildError, yamls_strict


def _rows(d: dict) -> list:
    rows = []
    for key in ("backbone", "head"):
        part = d.get(key)
        rows += part if isinstance(part, list) else []
    return rows


def is_plugin_yaml(d: dict, namespace: dict) -> bool:
    """True when a layer names a registered so-det-ultra block that Ultralytics does not define (``namespace``: the
    globals of ultralytics/nn/tasks.py), or the YAML uses the plugin's ``c3k_scales`` key."""
    if "c3k_scales" in d:
        return True
    for row in _rows(d):
        m = row[2] if isinstance(row, (list, tuple)) and len(row) == 4 else None
        if isinstance(m, str) and m not in namespace and m in BLOCKS:
            return True
    return False


def _where(d: dict) -> str:
    return str(d.get("yaml_file") or "the model YAML")


def check_sections(d: dict) -> None:
    """Raise :class:`ModelBuildError` when ``backbone:`` or ``head:`` is present but empty or not a list of rows."""
    for key in ("backbone", "head"):
        part = d.get(key)
        if key in d and (not isinstance(part, list) or not part):
            got = "empty" if not part else f"a {type(part).__name__}, not a list"
            raise ModelBuildError(
                f"{_where(d)}: '{key}:' is {got}; list its layers as [from, repeats, module, args] rows "
                "(see a shipped YAML, e.g. so-det-s.yaml)"
            )


def check_activation(d: dict) -> None:
    """Raise :class:`ModelBuildError` unless ``activation:`` is absent or a plain ``nn.<Name>(<literal args>)``."""
    act = d.get("activation")
    if not act:
        return
    import torch.nn as nn

    try:
        call = ast.parse(str(act).strip(), mode="eval").body
        ok = isinstance(call, ast.Call) and _is_nn_attr(call.func)
        klass = getattr(nn, call.func.attr, None) if ok else None
        ok = isinstance(klass, type) and issubclass(klass, nn.Module) and all(k.arg for k in call.keywords)
        for node in [*call.args, *(k.value for k in call.keywords)] if ok else ():
            ast.literal_eval(node)  # raises ValueError for anything but a literal
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        ok = False
    if not ok:
        raise ModelBuildError(
            f"{_where(d)}: activation {act!r} is refused: so-det-ultra model YAMLs accept only a torch.nn module "
            "with literal arguments, e.g. 'nn.SiLU()' or 'nn.LeakyReLU(0.1)'"
        )


def _is_nn_attr(node) -> bool:
    """``nn.<Name>`` or ``torch.nn.<Name>``."""
    if not isinstance(node, ast.Attribute):
        return False
    v = node.value
    if isinstance(v, ast.Name):
        return v.id == "nn"
    return isinstance(v, ast.Attribute) and v.attr == "nn" and isinstance(v.value, ast.Name) and v.value.id == "torch"


def check_yaml(d: dict, namespace: dict) -> None:
    """:func:`check_sections` for every YAML; :func:`check_activation` for YAMLs with so-det-ultra blocks, and for
    every YAML inside :func:`~so_det_ultra.registry.strict_yamls`."""
    check_sections(d)
    if yamls_strict() or is_plugin_yaml(d, namespace):
        check_activation(d)
