"""What so-det-ultra's commands read: checkpoints by content (the safe loader whatever the file is called), model
YAMLs held to the ``activation:`` rule, damaged checkpoints, export metadata and shard records as one line naming the
file, and inputs that cannot be read (skipped and counted wherever they sort; pipes never opened).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import RunsCode
from ultralytics import YOLO

from so_det_ultra.cli import main
from so_det_ultra.highres.common import load_model
from so_det_ultra.highres.engines import open_predictor
from so_det_ultra.nn.checkpoints import UnsafeCheckpointError
from so_det_ultra.registry import ModelBuildError

FAST = ["--mode", "sparse", "--thr", "0", "--conf", "0.000001", "--max-det", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``good.pt``: an untrained 3-class so-det-esod-n; ``evil.pt``: the same with a pickle that runs
    ``os.mkdir(marker)`` when loaded in full; ``marker``."""
    from ultralytics.nn.tasks import DetectionModel

    root = tmp_path_factory.mktemp("ckpt")
    y = YOLO("so-det-esod-n.yaml")
    y.model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False)
    y.save(str(root / "good.pt"))
    ckpt = torch.load(root / "good.pt", weights_only=False)
    ckpt["extra"] = RunsCode(root / "ran")
    torch.save(ckpt, root / "evil.pt")
    return root / "good.pt", root / "evil.pt", root / "ran"


def so_det(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


# ========================================================================================================= loading


@pytest.mark.parametrize("name", ["evil.PT", "evil.pth", "evil"])
def test_checkpoints_are_loaded_by_content_whatever_their_name(ckpts, tmp_path, capsys, name):
    """A code-running pickle named ``.PT``, ``.pth`` or without a suffix is refused by every predictor, by export and
    by seeker fitting."""
    _, evil, marker = ckpts
    if marker.exists():
        marker.rmdir()  # each test starts without it
    renamed = tmp_path / name
    shutil.copyfile(evil, renamed)
    for mode in ("sparse", "sliced", "dense"):
        with pytest.raises(UnsafeCheckpointError, match=f"{name}: safe loading refused it"):
            open_predictor(renamed, mode, device="cpu")
    rc, err = so_det(capsys, "export", "--sparse", "--model", renamed, "--out", tmp_path / "exp")
    assert rc == 2 and "safe loading refused it" in err
    rc, err = so_det(capsys, "fit-seeker", "--model", renamed, "--data", tmp_path / "d.yaml", "--out", tmp_path / "f")
    assert rc == 2 and "safe loading refused it" in err and not (tmp_path / "f").exists()
    assert not marker.exists(), "the checkpoint's code ran"


def test_a_good_checkpoint_loads_whatever_its_name(ckpts, tmp_path):
    good, _, _ = ckpts
    for name in ("best.pth", "best.PT", "best"):
        shutil.copyfile(good, tmp_path / name)
        assert type(load_model(tmp_path / name)).__name__ == "DetectionModel"


def test_code_in_the_activation_of_any_yaml_our_commands_build_is_refused(tmp_path):
    """A YAML of Ultralytics blocks only, with code in ``activation:``: refused by ``so-det predict``'s predictors
    (Ultralytics' own ``YOLO(...)`` keeps its behaviour, tested in test_safe_loading.py)."""
    import ultralytics

    stock = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/11/yolo11.yaml").read_text())
    marker = tmp_path / "ran"
    path = tmp_path / "yolo11n.yaml"
    path.write_text(yaml.safe_dump({**stock, "activation": f"__import__('pathlib').Path('{marker}').touch()"}))
    for mode in ("sliced", "dense"):
        with pytest.raises(ModelBuildError, match=r"yolo11n\.yaml: activation .* is refused"):
            open_predictor(path, mode, device="cpu")
    assert not marker.exists(), "the activation string was executed"


@pytest.mark.parametrize(
    "data,words",
    [
        (b"", "the file is empty (0 bytes)"),
        ("half", "a damaged or truncated zip archive"),
        (b"model: so-det-n.yaml\n", "text, not a PyTorch checkpoint"),
        (bytes(range(256)), "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"),
        (b"\x80\x02}q\x00.", "not a loadable checkpoint"),
    ],
    ids=["zero-byte", "truncated", "text", "not-a-pickle", "a-pickle-not-from-torch"],
)
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_a_broken_checkpoint_is_one_line_naming_the_file(ckpts, tmp_path, capsys, data, words, suffix):
    good, _, _ = ckpts
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2] if data == "half" else data)
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.jpg"), np.zeros((32, 32, 3), np.uint8))
    for mode in ("sparse", "dense"):
        rc, err = so_det(capsys, "predict", "--model", bad, "--source", src, "--mode", mode, "--save-dir", tmp_path)
        assert rc == 2 and f"{bad}" in err and words in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_export_refusal_hint_names_an_option_export_accepts(ckpts, tmp_path, capsys):
    _, evil, marker = ckpts
    rc, err = so_det(capsys, "export", "--sparse", "--model", evil, "--out", tmp_path / "exp")
    assert rc == 2 and "--unsafe-load" in err and "so-det predict" not in err, err
    from so_det_ultra.cli import build_parser

    args = build_parser().parse_args(["export", "--sparse", "--model", "m.pt", "--unsafe-load"])
    assert args.unsafe_load is True


def _metadata() -> dict:
    return {
        "format": "onnx",
        "names": {"0": "a"},
        "stride": 16,
        "cell": 8,
        "align": 2,
        "factor": {"2": 2},
        "seeker": 4,
        "stem_outputs": [2],
        "rest_inputs": [2],
        "defaults": {"thr": None, "patch": None, "margin": 2},
        "graphs": 2,
    }


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda m: "{not json", "not readable JSON"),
        (lambda m: [m], "a JSON list, not an object"),
        (lambda m: {**m, "names": ["a"]}, "'names' must map class indices to names"),
        (lambda m: {**m, "stride": "16"}, "'stride' must be a positive number"),
        (lambda m: {k: v for k, v in m.items() if k != "cell"}, "'cell' must be a positive integer"),
        (lambda m: {**m, "factor": {"2": None}}, "'factor' must map layer indices"),
        (lambda m: {**m, "seeker": "4"}, "'seeker' must be a layer index"),
        (lambda m: {**m, "rest_inputs": [7]}, "every 'rest_inputs' layer"),
        (lambda m: {**m, "defaults": {"thr": "high"}}, "'defaults' must hold numbers"),
    ],
    ids=["text", "list", "names", "stride", "no-cell", "factor", "seeker", "rest-inputs", "defaults"],
)
def test_a_damaged_export_metadata_is_one_line(tmp_path, capsys, edit, words):
    folder = tmp_path / "esod_sparse_onnx"
    folder.mkdir()
    meta = edit(_metadata())
    (folder / "metadata.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.jpg"), np.zeros((32, 32, 3), np.uint8))
    rc, err = so_det(capsys, "predict", "--model", folder, "--source", src, "--save-dir", tmp_path / "out")
    assert rc == 2 and f"{folder / 'metadata.json'}: {words}" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_a_damaged_export_graph_is_one_line(tmp_path, capsys):
    folder = tmp_path / "esod_sparse_onnx"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps(_metadata()))
    (folder / "stem.onnx").write_bytes(b"\x08\x07 half a graph")
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "a.jpg"), np.zeros((32, 32, 3), np.uint8))
    rc, err = so_det(capsys, "predict", "--model", folder, "--source", src, "--save-dir", tmp_path / "out")
    assert rc == 2 and f"{folder}: a graph cannot be loaded" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# ================================================================================================ merge shards


def _shard(folder: Path, job=None, rows=None) -> Path:
    """A save folder of one input with ``job`` as its job file and ``rows`` as its record's rows."""
    (folder / "results").mkdir(parents=True)
    sig = {"model": "m.pt", "mode": "sparse", "options": {}, "vid_stride": 1, "tracker": None, "shard": None}
    doc = job if job is not None else {"signature": sig, "inputs": [[0, "/data/a.jpg", "image", "a.jpg"]]}
    (folder / "job.json").write_text(json.dumps(doc))
    row = {"image_id": "a", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}
    record = {"input": "/data/a.jpg", "kind": "image", "rows": [row] if rows is None else rows, "frames": 1}
    (folder / "results" / "a.jpg.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize(
    "job,rows,words",
    [
        (None, "garbage", "a.jpg.json: expected a JSON list of {image_id, category_id, bbox, score} rows"),
        (None, [{"image_id": "a"}], "a.jpg.json: expected a JSON list of"),
        (None, [{"image_id": "a", "category_id": 1, "bbox": "x", "score": 1}], "rows have a bbox that is not"),
        ({"signature": None, "inputs": []}, None, "has no job signature"),
        ({"signature": {"model": "m", "mode": "s", "options": {}}, "inputs": "all"}, None, "inputs are not"),
        ({"signature": {"model": "m", "mode": "s", "options": {}}, "inputs": [[0, 1]]}, None, "inputs are not"),
    ],
    ids=["rows-a-string", "row-keys", "bbox", "null-signature", "inputs-a-string", "short-input"],
)
def test_merge_refuses_damaged_shards_with_one_line(tmp_path, capsys, job, rows, words):
    _shard(tmp_path / "s1", job, rows)
    rc, err = so_det(capsys, "merge-predictions", tmp_path / "merged.json", tmp_path / "s1")
    assert rc == 2 and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "merged.json").exists()


# ====================================================================================================== inputs


def _slow_video(path: Path) -> Path:
    """A 3-frame MJPG AVI whose header says 1e-6 frames per second."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for k in range(3):
        w.write(np.full((48, 64, 3), 40 * k, np.uint8))
    w.release()
    data = bytearray(path.read_bytes())
    at = data.index(b"strh") + 8 + 20  # AVISTREAMHEADER dwScale, dwRate
    struct.pack_into("<II", data, at, 1_000_000, 1)
    path.write_bytes(bytes(data))
    return path


def _predict(capsys, model, src: Path, out: Path) -> tuple[int, str, list]:
    """``so-det predict`` in this process: (exit code, stdout + stderr, Ultralytics' log messages)."""
    from ultralytics.utils import LOGGER

    seen = []

    def keep(record):
        seen.append(record.getMessage())
        return True

    LOGGER.addFilter(keep)
    try:
        capsys.readouterr()
        rc = main(["predict", "--model", str(model), "--source", str(src), *FAST, "--save-dir", str(out)])
    finally:
        LOGGER.removeFilter(keep)
    res = capsys.readouterr()
    return rc, res.out + res.err, seen


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((48, 64, 3), 90, np.uint8))
    return path


def test_unreadable_videos_are_skipped_and_counted_wherever_they_sort(ckpts, tmp_path, capsys):
    good, _, _ = ckpts
    for bad in ("a.mp4", "z.mp4"):  # before and after the image
        src = tmp_path / bad / "src"
        _image(src / "b.jpg")
        (src / bad).write_bytes(b"not a video")
        rc, out, _ = _predict(capsys, good, src, tmp_path / bad / "out")
        assert rc == 0 and "saved 1 image(s) to" in out and "(1 unreadable, skipped)" in out, (bad, out[-2000:])


def test_an_mpo_image_is_predicted_and_saved_in_a_format_opencv_writes(ckpts, tmp_path, capsys):
    good, _, _ = ckpts
    src = tmp_path / "src"
    os.replace(_image(src / "c.jpg"), src / "c.mpo")  # MPO: JPEG frames; OpenCV reads it but has no MPO writer
    rc, out, _ = _predict(capsys, good, src, tmp_path / "out")
    assert rc == 0 and "saved 1 image(s)" in out, out[-2000:]
    assert cv2.imread(str(tmp_path / "out" / "c.jpg")) is not None


def test_a_video_without_a_usable_frame_rate_gets_the_default(ckpts, tmp_path, capsys):
    good, _, _ = ckpts
    src = tmp_path / "src"
    src.mkdir()
    _slow_video(src / "slow.avi")
    rc, out, log = _predict(capsys, good, src, tmp_path / "out")
    assert rc == 0 and "saved 0 image(s) and 1 video(s)" in out, out[-2000:]
    assert any("slow.avi gives no usable frame rate" in m and "written at 30 fps" in m for m in log), log
    cap = cv2.VideoCapture(str(tmp_path / "out" / "slow.mp4"))
    assert cap.get(cv2.CAP_PROP_FPS) == 30 and cap.get(cv2.CAP_PROP_FRAME_COUNT) == 3
    cap.release()


def test_a_named_pipe_among_the_inputs_is_skipped_never_opened(ckpts, tmp_path, capsys):
    """A reader that opened the pipe would wait for a writer for ever: a watchdog thread plays the writer after
    300 s (only a broken build ever needs it) and the test fails if it had to."""
    good, _, _ = ckpts
    src = tmp_path / "src"
    _image(src / "b.jpg")
    os.mkfifo(src / "x.jpg")
    finished, rescued = threading.Event(), []

    def watchdog():
        if not finished.wait(300):
            rescued.append(True)
            os.close(os.open(src / "x.jpg", os.O_WRONLY))  # the blocked reader gets end-of-file

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    try:
        rc, out, log = _predict(capsys, good, src, tmp_path / "out")
    finally:
        finished.set()
        guard.join()
    assert not rescued, "so-det predict opened the named pipe x.jpg and waited for a writer"
    assert rc == 0 and "saved 1 image(s)" in out, out[-3000:]
    assert any("x.jpg: not a regular file" in m for m in log), log
