"""Reading checkpoints by content, safely: what every command that loads a ``.pt`` shares (prediction, export,
seeker fitting).

A file is a checkpoint when its bytes say so (a ``torch.save`` zip archive or a pickle), whatever it is called, and it
is read with Ultralytics' restricted loader (``torch_safe_load(..., safe_only=True)`` in ultralytics/nn/tasks.py:
``torch.load(weights_only=True)`` with an allow-list of Ultralytics', torch's and the registered so-det-ultra
classes). A pickle that names other code is refused (:class:`UnsafeCheckpointError`), a damaged file gives one line
naming it (:class:`CheckpointError`); ``unsafe=True`` reads it the stock way, for files the user trusts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint that safe (weights-only) loading refuses: it names code outside the known model classes."""


class CheckpointError(ValueError):
    """A file that is not a checkpoint safe loading can read (empty, truncated, text, not a pickle); the message is one
    line naming the file and what is wrong."""


YAML_SUFFIXES = (".yaml", ".yml")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", "")  # names that mean a checkpoint when the bytes do not tell
UNSAFE_HINT = "load it only if you trust where it came from: --unsafe-load (Python: unsafe_load=True)"


def model_kind(model) -> str:
    """``"checkpoint"``, ``"yaml"``, ``"export"`` (for ``AutoBackend``) or ``"object"``, by content where it tells.

    A file that is a ``torch.save`` zip archive or a pickle is a checkpoint whatever it is called (``evil.PT``,
    ``best.pth``, no suffix), so it always goes through the safe loader; a TorchScript archive is an export. Other
    files go by their name: ``.yaml``/``.yml`` a model YAML, ``.pt``/``.pth``/``.ckpt``/none a (damaged) checkpoint
    that :func:`safe_checkpoint` then describes, anything else an export.
    """
    if not isinstance(model, (str, Path)):
        return "object"
    p = Path(model)
    suffix = p.suffix.lower()
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            return "export" if _torchscript(p) else "checkpoint"
        if head[:1] == b"\x80":  # a pickle (protocol 2 and later): torch's legacy format
            return "checkpoint"
    elif p.is_dir():
        return "export"
    if suffix in YAML_SUFFIXES:
        return "yaml"
    return "checkpoint" if suffix in CHECKPOINT_SUFFIXES else "export"


def _torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` unreadable as a checkpoint before torch sees it (empty, text, not a zip or pickle, a
    damaged zip), or None."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty (0 bytes)"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"a damaged or truncated zip archive ({err})"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "a zip archive without a torch checkpoint in it (no data.pkl)"
        return None
    if head[:1] == b"\x80":
        return None
    try:
        head.decode("utf-8")
        return "text, not a PyTorch checkpoint (a model YAML needs a .yaml or .yml name)"
    except UnicodeDecodeError:
        return "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"


@contextmanager
def pt_alias(path: Path, copy: bool = False):
    """``path`` under a name ending in ``.pt`` (what Ultralytics' loaders take): itself, or a link (``copy``: a
    private copy, so that the bytes checked are the bytes loaded) in a fresh private folder."""
    if not copy and path.suffix.lower() == ".pt":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="so-det-") as tmp:
        alias = Path(tmp) / f"{path.stem or 'model'}.pt"
        if copy:
            shutil.copyfile(path, alias)
        else:
            try:
                os.symlink(path.resolve(), alias)
            except OSError:  # no symbolic links (Windows without the privilege)
                shutil.copyfile(path, alias)
        yield alias


def _one_line(err: BaseException, alias: Path, path: Path) -> str:
    """The first line of ``err``'s message, naming ``path`` where it named ``alias``, without Ultralytics' emoji."""
    text = str(err).replace(str(alias), str(path)).strip().splitlines()
    text = (text[0] if text else type(err).__name__).replace("ERROR ❌️", "").strip()
    return text if str(path) in text else f"{path}: {text}"


def _load_error(err: Exception, alias: Path, path: Path) -> ValueError:
    """The error to raise for ``err`` from Ultralytics' safe loader: refused code, or a one-line damaged-file error."""
    import pickle
    import re

    text = str(err.__cause__ or err)
    names = sorted(set(re.findall(r"unsupported(?: global:)? GLOBAL ([\w.]+)", text, re.IGNORECASE)))
    refused = isinstance(err, ModuleNotFoundError) or (
        names and isinstance(err.__cause__ or err, pickle.UnpicklingError)
    )
    if refused:
        cause = f"it names {', '.join(names) or 'code'} outside the allow-list of model classes"
        return UnsafeCheckpointError(f"{path}: safe loading refused it ({cause}); {UNSAFE_HINT}")
    if type(err).__module__.startswith("so_det_ultra"):  # e.g. a checkpoint naming blocks this version lacks
        return CheckpointError(_one_line(err, alias, path))
    cause = err.__cause__ or err
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(cause))  # torch's reason, after its preamble
    why = found.group(1) if found else _one_line(cause, alias, path).split(": ", 1)[-1]
    why = "the file ends early" if why in ("", type(cause).__name__) else why[:200]
    return CheckpointError(f"{path}: not a loadable checkpoint ({type(cause).__name__}: {why})")


def read_checkpoint(path: Path, shown: Path | None = None, unsafe: bool = False) -> tuple[dict, torch.nn.Module]:
    """``(checkpoint dict, its model)`` of checkpoint ``path`` (the ``ema`` module, else ``model``), read weights-only.

    Any name works (``.pt``, ``.PT``, ``.pth``, none). Raises :class:`UnsafeCheckpointError` for a pickle that names
    code outside the allow-list and :class:`CheckpointError` (one line naming ``shown``, default ``path``) for a file
    that is no checkpoint or a damaged one. ``unsafe`` reads the full pickle (it can run code stored in the file).
    """
    from ultralytics.nn import tasks

    path = Path(path)
    shown = Path(shown or path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{shown}: {problem}")
    with pt_alias(path) as alias:
        try:
            ckpt, _ = tasks.torch_safe_load(str(alias), safe_only=not unsafe)
        except Exception as err:  # torch and Ultralytics raise a dozen types for one condition: an unusable file
            raise _load_error(err, alias, shown) from err
    candidate = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(candidate, torch.nn.Module):
        raise CheckpointError(f"{shown} holds no model that safe loading can rebuild (no 'model' or 'ema' module)")
    return ckpt, candidate


def safe_checkpoint(path: Path, shown: Path | None = None):
    """The model of checkpoint ``path`` (:func:`read_checkpoint`), set up as ``load_checkpoint`` does
    (ultralytics/nn/tasks.py): float32, training arguments, ``pt_path``, ``task``, ``stride``."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    shown = Path(shown or path)
    ckpt, candidate = read_checkpoint(path, shown)
    model = candidate.float()
    model.args = {**DEFAULT_CFG_DICT, **(ckpt.get("train_args") or {})}
    model.pt_path = str(shown)
    model.task = getattr(model, "task", "detect")
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    return model
