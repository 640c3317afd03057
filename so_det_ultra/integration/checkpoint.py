"""Checkpoints record the so-det-ultra version that wrote them; loading one whose blocks this version lacks says so.

Two ledger changes: an ``on_pretrain_routine_end`` callback stamps this version into the trained model's YAML dict
(``model.yaml["so_det_ultra"]``, on the model and its EMA copy, which travel inside every checkpoint Ultralytics
writes), and ``ultralytics.nn.tasks.torch_safe_load`` is wrapped: the classes a checkpoint names are listed without
running it (``torch.serialization.get_unsafe_globals_in_checkpoint``), and a missing ``so_det_ultra.*`` class (or,
in a stamped checkpoint, a user's registered block) raises :class:`CheckpointBlockError` naming the block(s), the
version that wrote the file and this version. The stamp is read from the pickle's opcodes (:mod:`pickletools`), so
it works with and without ``ULTRALYTICS_SAFE_LOAD=1``; under safe loading only so-det-ultra's own or already
imported modules are imported. The ledger table: docs/architecture.md, "The host patches".
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pickle
import pickletools
import sys
import zipfile
from pathlib import Path

from so_det_ultra import _version

KEY = "so_det_ultra"  # model.yaml key holding the version that wrote the checkpoint
PACKAGE = "so_det_ultra."
MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}


class CheckpointBlockError(TypeError):
    """A checkpoint uses so-det-ultra blocks that this version does not have (a ``TypeError``, as Ultralytics raises
    for checkpoints it cannot load)."""


def plugin_version() -> str:
    """This so-det-ultra version (read at call time from :mod:`so_det_ultra._version`)."""
    return _version.__version__


def uses_plugin(model) -> bool:
    """True when ``model`` holds a module whose class is a registered so-det-ultra block (ours or a user's)."""
    from so_det_ultra.registry import BLOCKS

    modules = model.modules() if hasattr(model, "modules") else ()
    return any(BLOCKS.find_class(type(m)) is not None or type(m).__module__.startswith(PACKAGE) for m in modules)


def on_pretrain_routine_end(trainer):
    """Stamp this version into the trained model's YAML dict (and its EMA copy, which the checkpoints store)."""
    from ultralytics.utils.torch_utils import unwrap_model

    model = unwrap_model(trainer.model) if getattr(trainer, "model", None) is not None else None
    ema = getattr(getattr(trainer, "ema", None), "ema", None)
    for m in (model, ema):
        if m is not None and isinstance(getattr(m, "yaml", None), dict) and uses_plugin(m):
            m.yaml[KEY] = plugin_version()


def written_by(file) -> str | None:
    """The so-det-ultra version stamped in checkpoint ``file``, read from the pickle opcodes (nothing is executed).

    None when the checkpoint has no stamp (written without so-det-ultra blocks or by a version before the stamp) or
    is not a ``torch.save`` zip archive.
    """
    try:
        with zipfile.ZipFile(file) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            data = z.read(name)
        prev = None
        for op, arg, _ in pickletools.genops(data):
            if op.name in MEMO_OPS:  # memoizing the key sits between the key and its value
                continue
            if prev == KEY and isinstance(arg, str) and op.name.endswith("UNICODE"):
                return arg
            prev = arg if isinstance(arg, str) and op.name.endswith("UNICODE") else None
    except (OSError, StopIteration, ValueError, zipfile.BadZipFile, pickle.PickleError):
        pass
    return None


def _globals_in(file) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # not a torch.save zip archive: the loader reports that itself
        return []


def _resolves(name: str, may_import: bool) -> bool | None:
    """Whether ``module.attr`` exists: True/False, or None when it cannot be told without importing foreign code."""
    module, _, attr = name.rpartition(".")
    if not module:
        return None
    mod = sys.modules.get(module)
    if mod is None:
        top = module.split(".")[0]
        if not (may_import or module.startswith(PACKAGE) or top == PACKAGE[:-1]):
            return False if importlib.util.find_spec(top) is None else None
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return False
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def missing_blocks(file, may_import: bool = False) -> list[str]:
    """Classes checkpoint ``file`` names that cannot be found: the ``so_det_ultra.*`` ones, else, when the checkpoint
    carries a so-det-ultra stamp, any other (a user's registered block). ``may_import``: import foreign modules the
    checkpoint names to look (what an unrestricted unpickler would do anyway)."""
    names = _globals_in(file)
    ours = [n for n in names if n.startswith(PACKAGE) and _resolves(n, True) is False]
    if ours:
        return ours
    other = [n for n in names if not n.startswith(PACKAGE) and _resolves(n, may_import) is False]
    return other if other and written_by(file) is not None else []


def message(file, missing: list[str]) -> str:
    """The error text: the missing block(s), the version that wrote ``file`` and this version, and what to do."""
    written, current = written_by(file), plugin_version()
    blocks = ", ".join(f"{n.rpartition('.')[2]} ({n})" for n in missing)
    by = f"so-det-ultra {written}" if written else "a so-det-ultra version that did not record itself"
    if all(n.startswith(PACKAGE) for n in missing):
        fix = f"pip install so-det-ultra=={written}" if written else "the so-det-ultra version it was trained with"
        fix = f"Load it with {fix}, or retrain with this version."
    else:
        fix = "Import the module that defines and registers them before loading, or use the code it was trained with."
    return (
        f"{file} was written by {by} (this is so-det-ultra {current}) and uses block(s) that cannot be found "
        f"(renamed or removed): {blocks}. {fix}"
    )


def wrap_torch_safe_load(load):
    """Ultralytics' ``torch_safe_load`` with the block check before it and the clear error after a failed load."""

    @functools.wraps(load)
    def torch_safe_load(weight, *args, **kwargs):
        from ultralytics.utils import SAFE_LOAD

        file = Path(str(weight))
        if not file.is_file():
            return load(weight, *args, **kwargs)
        missing = missing_blocks(file)  # before Ultralytics tries to pip-install a module the file names
        if missing:
            raise CheckpointBlockError(message(file, missing))
        try:
            return load(weight, *args, **kwargs)
        except (AttributeError, ImportError, TypeError, pickle.UnpicklingError) as err:
            safe = kwargs.get("safe_only", args[0] if args else None)
            missing = missing_blocks(file, may_import=not (SAFE_LOAD if safe is None else safe))
            if missing:
                raise CheckpointBlockError(message(file, missing)) from err
            raise

    return torch_safe_load


def install(ledger):
    """Append the stamping callback and wrap ``torch_safe_load`` (every module holding it)."""
    import ultralytics.nn.tasks as tasks
    from ultralytics.utils.callbacks import base

    event = "on_pretrain_routine_end"
    ledger.append(base.default_callbacks[event], on_pretrain_routine_end, f"{base.__name__}.default_callbacks[{event}]")
    ledger.rebind(tasks, "torch_safe_load", wrap_torch_safe_load(tasks.torch_safe_load))
