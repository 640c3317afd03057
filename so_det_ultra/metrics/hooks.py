"""Ultralytics callbacks: size-wise APs in ``yolo val`` and in the validation of ``yolo train``.

Registered through :data:`so_det_ultra.integration.callbacks.CALLBACKS` (Ultralytics' public default-callback table);
each does nothing unless the data YAML carries the ``so_det:`` key and the task is ``detect``. The flow of one
``yolo val`` (docs/architecture.md, "Metrics flow"): ``on_val_start`` sets ``max_det`` and ``save_json``;
``on_val_end`` reads the split's ground truth once per validator (:mod:`.truth`), scores ``validator.jdict``
(:func:`.evaluate.evaluate_split`), prints the table and writes ``so_det_metrics.json``/``.csv`` and ``so_det_ap.png``;
``on_fit_epoch_end`` adds the ``so_det/AP...`` columns to the trainer's metrics and ``results.csv`` row, and
``on_train_epoch_end`` takes them out of ``trainer.metrics`` again. Details: docs/metrics.md.
"""

from __future__ import annotations

import csv
import json
import math

from so_det_ultra.data.contract import sidecar_folder
from so_det_ultra.metrics.evaluate import evaluate_split
from so_det_ultra.metrics.protocol import protocol_from_data
from so_det_ultra.metrics.truth import load_eval_truth

PREFIX = "so_det/"


def _protocol(validator):
    """The run's protocol, or None when this validator is not ours to touch."""
    data = getattr(validator, "data", None)
    if getattr(validator.args, "task", None) != "detect" or not hasattr(validator, "pred_to_json"):
        return None
    return protocol_from_data(data) if isinstance(data, dict) else None


def on_val_start(validator):
    """Raise ``max_det`` to ``so_det.max_det`` while it is Ultralytics' default (the "explicit or default" test of
    Ultralytics' ``DetectionValidator._check_max_det``: a ``max_det`` the user gives wins), turn on ``save_json`` (the
    predictions we score, ``validator.jdict``) and warn when ``imgsz`` is not the protocol's (the dataloader exists
    already, so it cannot be changed here)."""
    p = _protocol(validator)
    if p is None:
        return
    from ultralytics.utils import DEFAULT_CFG, LOGGER

    args = validator.args
    if args.max_det == DEFAULT_CFG.max_det and p.max_det != args.max_det:
        LOGGER.info(f"so-det: max_det={p.max_det} (so_det.max_det of the data YAML, {p.name} protocol)")
        args.max_det = p.max_det
    args.save_json = True  # the predictions (validator.jdict) are what we evaluate
    imgsz = getattr(args, "imgsz", None)
    imgsz = max(imgsz) if isinstance(imgsz, (list, tuple)) and imgsz else imgsz
    if p.imgsz and imgsz and imgsz != p.imgsz:
        LOGGER.warning(
            f"so-det: imgsz={args.imgsz}, but the {p.name} protocol feeds each tile at {p.imgsz} (so_det.imgsz); "
            f"pass imgsz={p.imgsz} for numbers comparable with published ones"
        )


def on_val_end(validator):
    """Score ``validator.jdict`` against the split's ground truth, report and save the result.

    The numbers go to the log, ``so_det_metrics.json`` (and, outside training, a row of ``so_det_metrics.csv``),
    ``so_det_ap.png`` with ``plots``, ``validator.metrics.so_det`` (what ``model.val()`` returns) and
    ``validator.so_det_pending`` (for :func:`on_fit_epoch_end`). A failure is a warning: it must not end a training run.
    """
    p = _protocol(validator)
    if p is None:
        return
    from ultralytics.utils import LOGGER

    try:
        names = ["object"] if validator.args.single_cls else validator.data.get("names")
        result = evaluate_split(_truth(validator, p), validator.jdict, p, names)
    except Exception as err:  # a metrics bug must not end a long training run; say so loudly instead
        LOGGER.warning(f"so-det: size-wise evaluation failed: {type(err).__name__}: {err}")
        return
    LOGGER.info(result.table(per_class=validator.args.verbose and not validator.training))
    _save(validator, result)
    validator.so_det_pending = result.metrics  # picked up by on_fit_epoch_end when a trainer runs this validator


def _truth(validator, p):
    """The split's :class:`~.truth.EvalTruth`, read once per validator (not every epoch)."""
    files = list(validator.dataloader.dataset.im_files)
    cache = getattr(validator, "_so_det_truth", None)
    if cache is not None and cache[0] == (files, p.tiles):
        return cache[1]
    data = validator.data
    truth = load_eval_truth(
        files, data.get("path", "."), sidecar_folder(data), bool(validator.args.single_cls), p.tiles
    )
    if p.tiles and not truth.n_tiles:
        from ultralytics.utils import LOGGER

        LOGGER.warning(
            f"so-det: the {p.name} protocol runs the model on tiles, but this split holds full images; the "
            "numbers below are for full-frame inference. Convert the split as tiles (so-det convert soda-d, "
            "default) or set so_det: {eval: soda-d-fullframe} (docs/metrics.md)"
        )
    validator._so_det_truth = ((files, p.tiles), truth)
    return truth


def _save(validator, result):
    """``so_det_metrics.json``, the csv row outside training, the plot, and ``validator.metrics.so_det``."""
    from ultralytics.utils import LOGGER

    values, save_dir = result.as_dict(), validator.save_dir
    (save_dir / "so_det_metrics.json").write_text(json.dumps(values, indent=2))
    if not validator.training:  # during training the row (with its epoch) is written by on_fit_epoch_end
        _append_csv(save_dir / "so_det_metrics.csv", {"epoch": "", "split": validator.args.split, **result.metrics})
    if validator.args.plots:
        from so_det_ultra.metrics.plots import plot_ap

        try:
            plot_ap(result, save_dir / "so_det_ap.png")
        except Exception as err:
            LOGGER.warning(f"so-det: AP plot failed: {err}")
    if getattr(validator, "metrics", None) is not None:
        validator.metrics.so_det = values


def on_fit_epoch_end(trainer):
    """Add ``so_det/AP...`` to ``trainer.metrics`` (seen by logger integrations that run after it) and to the epoch's
    row of ``results.csv`` (written by the trainer before this event), and a row with the epoch to
    ``so_det_metrics.csv``."""
    validator = getattr(trainer, "validator", None)
    metrics = getattr(validator, "so_det_pending", None)
    if not metrics:
        return
    validator.so_det_pending = None
    cols = {PREFIX + k: v for k, v in metrics.items()}
    if isinstance(getattr(trainer, "metrics", None), dict):
        trainer.metrics.update({k: (math.nan if v is None else v) for k, v in cols.items()})
    from ultralytics.utils import RANK

    if RANK in {-1, 0} and _extend_results_row(trainer.csv, trainer.epoch + 1, cols):
        _append_csv(trainer.save_dir / "so_det_metrics.csv", {"epoch": trainer.epoch + 1, "split": "val", **metrics})


def on_train_epoch_end(trainer):
    """Take our keys out of ``trainer.metrics`` again before the next validation.

    When an epoch skips validation (``val=False``), Ultralytics writes the previous ``trainer.metrics`` into the new
    results.csv row; with our keys inside that dict its columns would shift against the header.
    """
    if isinstance(getattr(trainer, "metrics", None), dict):
        for k in [k for k in trainer.metrics if str(k).startswith(PREFIX)]:
            del trainer.metrics[k]


def _extend_results_row(path, epoch: int, cols: dict) -> bool:
    """Append ``cols`` to the row of ``epoch`` in Ultralytics' results.csv, adding header names when missing.

    Only the last row is touched, and only when it is the row this epoch's ``save_metrics`` just wrote (the final
    validation of ``best.pt`` fires ``on_fit_epoch_end`` without writing a row). Earlier rows without the columns
    read as empty (polars, which Ultralytics reads results.csv with, fills them with null).
    """
    if not path.is_file():
        return False
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2:
        return False
    header, row = lines[0].split(","), lines[-1].split(",")
    try:
        if int(float(row[0])) != epoch:
            return False
    except ValueError:
        return False
    header += [k for k in cols if k not in header]
    row += [""] * (len(header) - len(row))
    for k, v in cols.items():
        row[header.index(k)] = "" if v is None else f"{v:.6g}"
    lines[0], lines[-1] = ",".join(header), ",".join(row)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return True


def _append_csv(path, row: dict):
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(list(row))
        w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row.values()])
