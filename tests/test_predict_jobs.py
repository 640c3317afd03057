"""`so-det predict` as a job: sources (images, folders, videos), outputs (predictions.json, annotated video, MOT
tracks), shards + merge, resume after a kill, and the rules that keep a user's files (never over a source file, never
over another job's results)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml
from conftest import BIN, clean_env, python, run

from so_det_ultra.cli import main
from so_det_ultra.highres import jobs, sources

FAST = ["--mode", "sparse", "--thr", "0", "--conf", "0.000001", "--max-det", "20", "--device", "cpu"]
# Untrained detections score ~1e-4: a tracker that starts and keeps tracks at any score.
TRACKER = dict(
    tracker_type="bytetrack",
    track_high_thresh=0.0,
    track_low_thresh=0.0,
    new_track_thresh=0.0,
    track_buffer=30,
    match_thresh=0.8,
    fuse_score=False,
)


@pytest.fixture(scope="module")
def esod_pt(tmp_path_factory):
    """An untrained 3-class so-det-esod-n checkpoint (the classes of ``tiny_data``), the same in every process."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    path = tmp_path_factory.mktemp("model") / "esod.pt"
    yolo = YOLO("so-det-esod-n.yaml")
    yolo.model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False)
    yolo.model.names = {0: "square", 1: "disc", 2: "triangle"}
    yolo.save(str(path))
    return path


def write_video(path, frames: int = 6, size=(320, 256)):
    """A short MJPG video of a square moving right."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for k in range(frames):
        f = np.full((size[1], size[0], 3), 90, np.uint8)
        cv2.rectangle(f, (20 + 12 * k, 40), (60 + 12 * k, 80), (255, 255, 255), -1)
        w.write(f)
    w.release()
    return path


def write_images(folder, n: int, shape=(96, 128)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        cv2.imwrite(str(folder / f"im{k}.jpg"), (rng.random((*shape, 3)) * 255).astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory):
    """A folder of 5 images and 1 video (6 inputs)."""
    src = write_images(tmp_path_factory.mktemp("mixed") / "src", 5)
    write_video(src / "clip.avi")
    return src


def predict(*args, cwd):
    """`so-det predict` in a fresh process."""
    return run([BIN / "so-det", "predict", *map(str, args)], cwd=cwd, env=clean_env())


def so_det(*args):
    """`so-det ...` in this process; (exit code, stdout + stderr) via capsys is up to the caller."""
    return main([str(a) for a in args])


# --- sources and outputs --------------------------------------------------------------------------------------------


def test_video_source_writes_coco_json_annotated_video_and_mot_tracks(esod_pt, tmp_path):
    clip = write_video(tmp_path / "clip.avi")
    tracker = tmp_path / "tracker.yaml"
    tracker.write_text(yaml.safe_dump(TRACKER))
    out = tmp_path / "out"
    args = ["--model", esod_pt, "--source", clip, *FAST, "--save-dir", out, "--save-json", "--track"]
    res = predict(*args, "--tracker", tracker, cwd=tmp_path)
    assert "1 video(s)" in res.stdout
    rows = json.loads((out / "predictions.json").read_text())
    assert sorted({r["image_id"] for r in rows}) == [f"clip_{k:06d}" for k in range(6)]
    assert all(1 <= r["category_id"] <= 3 and len(r["bbox"]) == 4 and "file_name" not in r for r in rows)
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 6 and (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (320, 256)
    lines = [ln.split(",") for ln in (out / "tracks" / "clip.txt").read_text().splitlines()]
    assert lines and all(len(ln) == 10 and ln[7:] == ["-1", "-1", "-1"] for ln in lines)
    frames, ids = [int(ln[0]) for ln in lines], [int(ln[1]) for ln in lines]
    assert set(frames) == set(range(1, 7)) and min(ids) == 1
    per_id = {i: sorted(f for f, j in zip(frames, ids) if j == i) for i in set(ids)}
    assert any(len(fs) == 6 for fs in per_id.values()), "no box was tracked through the video"
    x, y, w, h = map(float, lines[0][2:6])
    assert w > 0 and h > 0 and 0 <= x <= 320 and 0 <= y <= 256


@pytest.mark.parametrize("tracker", ["bytetrack.yaml", "botsort.yaml"])
def test_ultralytics_trackers_run_offline_and_vid_stride_keeps_frame_indices(esod_pt, tmp_path, tracker, capsys):
    clip = write_video(tmp_path / "walk.avi")
    out = tmp_path / "out"
    argv = ["predict", "--model", esod_pt, "--source", clip, *FAST, "--save-dir", out, "--save-json", "--no-save"]
    assert so_det(*argv, "--track", "--tracker", tracker, "--vid-stride", "2") == 0
    ids = sorted({r["image_id"] for r in json.loads((out / "predictions.json").read_text())})
    assert ids == ["walk_000001", "walk_000003", "walk_000005"]  # every 2nd frame, indexed in the file
    assert (out / "tracks" / "walk.txt").is_file() and not (out / "walk.mp4").exists()  # --no-save: no video


def test_stream_loader_reads_frames_until_the_stream_ends(tmp_path):
    clip = write_video(tmp_path / "cam.avi")
    frames = list(sources.Frames(sources.Input(f"file://{clip}", "stream", "cam.mp4")))  # read as a live stream
    assert 1 <= len(frames) <= 6 and frames[0][1].shape == (256, 320, 3)
    assert sources.is_stream("0") and sources.is_stream("rtsp://cam/1") and not sources.is_stream(str(clip))


def test_sources_expand_folders_globs_and_lists_sorted_with_unique_names(tmp_path):
    a, b = write_images(tmp_path / "a", 2), write_images(tmp_path / "b", 1)
    write_video(a / "im0.avi", frames=2)
    (tmp_path / "list.txt").write_text(f"{b / 'im0.jpg'}\n")
    got = sources.expand([str(tmp_path / "list.txt"), str(a / "*.jpg"), str(a)])
    assert [(x.kind, x.name) for x in got] == [
        ("video", "im0.mp4"),  # a/im0.avi sorts before a/im0.jpg
        ("image", "im0.jpg"),
        ("image", "im1.jpg"),
        ("image", "im0_1.jpg"),  # b/im0.jpg, after a/ in path order
    ]
    assert [x.path for x in got] == sorted(x.path for x in got)
    with pytest.raises(FileNotFoundError, match="nothere"):
        sources.expand([str(tmp_path / "nothere")])


def test_eval_scores_the_written_predictions_json(esod_pt, tiny_data, tmp_path):
    data = yaml.safe_load(tiny_data.read_text())
    data["so_det"] = {"eval": "soda-d", "max_det": 100}
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    args = ["--model", esod_pt, "--source", tiny_data.parent / "images" / "val", *FAST, "--save-dir", out]
    predict(*args, "--save-json", "--no-save", cwd=tmp_path)
    rows = json.loads((out / "predictions.json").read_text())
    assert rows and {r["file_name"] for r in rows} <= {p.name for p in (tiny_data.parent / "images" / "val").iterdir()}
    res = run([BIN / "so-det", "eval", "--data", data_yaml, "--pred", out / "predictions.json"], cwd=tmp_path)
    assert "AP50" in res.stdout and "predictions" not in res.stderr.lower()


# --- shards, resume, merge ------------------------------------------------------------------------------------------


def test_shards_merged_equal_a_full_run(esod_pt, mixed_source, tmp_path, capsys):
    base = ["--model", esod_pt, "--source", mixed_source, *FAST, "--save-json", "--no-save"]
    predict(*base, "--save-dir", tmp_path / "full", cwd=tmp_path)
    for k in (1, 2):
        assert so_det("predict", *base, "--save-dir", tmp_path / f"s{k}", "--shard", f"{k}/2") == 0
    shard1 = json.loads((tmp_path / "s1" / jobs.JOB_FILE).read_text())["inputs"]
    assert [i for i, *_ in shard1] == [0, 2, 4]  # round robin over the 6 sorted inputs
    merged = tmp_path / "merged.json"
    assert so_det("merge-predictions", merged, tmp_path / "s2", tmp_path / "s1") == 0
    full = (tmp_path / "full" / "predictions.json").read_bytes()
    assert merged.read_bytes() == full and len(json.loads(full)) > 6
    capsys.readouterr()
    assert so_det("merge-predictions", merged, tmp_path / "s1", tmp_path / "s2") == 2  # OUT exists
    assert "exists; use --force" in capsys.readouterr().err
    assert so_det("merge-predictions", tmp_path / "m2.json", tmp_path / "s1") == 2
    assert "shard(s) 2 missing" in capsys.readouterr().err
    assert so_det("merge-predictions", tmp_path / "m3.json", tmp_path / "s1", tmp_path / "s1") == 2  # overlap
    assert so_det("merge-predictions", "--force", merged, tmp_path / "s1", tmp_path / "s2") == 0


KILL_AFTER_TWO = """
import os, sys
from so_det_ultra.highres import jobs
commit, n = jobs.Job.commit, [0]
def dying_commit(self, *args):
    commit(self, *args)
    n[0] += 1
    if n[0] == 2:
        os._exit(9)  # no clean-up, as SIGKILL
jobs.Job.commit = dying_commit
from so_det_ultra.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumed_equals_an_uninterrupted_run(esod_pt, mixed_source, tmp_path):
    base = ["predict", "--model", esod_pt, "--source", mixed_source, *FAST, "--save-json"]
    assert so_det(*base, "--save-dir", tmp_path / "whole") == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILL_AFTER_TWO, *map(str, base), "--save-dir", out]
    proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert len(list((out / jobs.RESULTS).glob("*.json"))) == 2 and not (out / "predictions.json").exists()
    (out / ".clip.999999999-00ff.tmp.mp4").write_bytes(b"half a video")  # as left by a run killed mid-video
    res = run([BIN / "so-det", *map(str, base), "--save-dir", out, "--resume"], cwd=tmp_path, env=clean_env())
    assert "2 done before (--resume)" in res.stdout
    assert (out / "predictions.json").read_bytes() == (tmp_path / "whole" / "predictions.json").read_bytes()
    for f in (tmp_path / "whole").glob("*.jpg"):  # the annotated copies too
        assert (out / f.name).is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary file left behind


def test_shard_and_resume_arguments_are_checked():
    assert jobs.parse_shard("3/8") == (3, 8) and jobs.parse_shard(None) is None
    for bad in ("0/2", "3/2", "1-2", "a/b"):
        with pytest.raises(ValueError, match="--shard"):
            jobs.parse_shard(bad)
    items = list(range(10))
    parts = [jobs.select_shard(items, (k, 3)) for k in (1, 2, 3)]
    assert sorted(i for p in parts for i, _ in p) == items and parts[0][:2] == [(0, 0), (3, 3)]


# --- overwrite rules and errors a user can act on -------------------------------------------------------------------


def test_save_dir_equal_to_the_source_folder_is_refused_and_inputs_survive(esod_pt, tmp_path, capsys):
    src = write_images(tmp_path / "frames", 2)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    rc = so_det("predict", "--model", esod_pt, "--source", src, *FAST, "--save-dir", src)
    assert rc == 2 and "would overwrite the source file" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    # Only predictions there (--no-save): nothing collides, so it is allowed.
    assert so_det("predict", "--model", esod_pt, "--source", src, *FAST, "--save-dir", src, "--no-save") == 0
    assert all((src / n).read_bytes() == b for n, b in before.items())


def test_a_non_image_jpg_is_skipped_and_the_batch_goes_on(esod_pt, tmp_path, capsys):
    src = write_images(tmp_path / "src", 2)
    (src / "broken.jpg").write_text("not an image")
    rc = so_det("predict", "--model", esod_pt, "--source", src, *FAST, "--save-dir", tmp_path / "out", "--save-json")
    out = capsys.readouterr()
    assert rc == 0 and "saved 2 image(s)" in out.out and "1 unreadable, skipped" in out.out
    assert {r["image_id"] for r in json.loads((tmp_path / "out" / "predictions.json").read_text())} == {"im0", "im1"}


def test_library_predictors_skip_a_broken_file_in_a_folder_but_not_a_named_one(tmp_path):
    from so_det_ultra.highres.common import read_images

    src = write_images(tmp_path / "src", 2)
    (src / "broken.jpg").write_text("not an image")
    assert [p.rsplit("/", 1)[-1] for p, _ in read_images(src)] == ["im0.jpg", "im1.jpg"]
    with pytest.raises(FileNotFoundError, match="broken.jpg"):
        read_images(src / "broken.jpg")


def test_another_jobs_predictions_and_user_files_are_not_overwritten(esod_pt, tmp_path, capsys):
    src = write_images(tmp_path / "src", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("[]  mine")
    argv = ["predict", "--model", esod_pt, "--source", src, *FAST, "--save-dir", out, "--save-json"]
    assert (
        so_det(*argv) == 2
        and "predictions.json exists and was not written by so-det predict" in capsys.readouterr().err
    )
    assert so_det(*argv, "--resume") == 2 and (out / "predictions.json").read_text() == "[]  mine"
    (out / "predictions.json").unlink()
    (out / "im0.jpg").write_bytes(b"user's own")
    assert so_det(*argv) == 2 and "im0.jpg exists and was not written by so-det predict" in capsys.readouterr().err
    assert (out / "im0.jpg").read_bytes() == b"user's own"
    assert so_det(*argv, "--force") == 0 and (out / "im0.jpg").read_bytes() != b"user's own"
    assert so_det(*argv) == 0  # the same job again: its own files
    assert so_det(*argv, "--conf", "0.5") == 2 and "another job" in capsys.readouterr().err
    assert so_det(*argv, "--conf", "0.5", "--force") == 0


def test_dense_warns_above_the_pixel_budget(esod_pt, tmp_path, capsys):
    from ultralytics.utils import LOGGER

    src = write_images(tmp_path / "src", 1, shape=(64, 320))
    seen = []

    def keep(rec):
        seen.append(rec.getMessage())
        return True

    LOGGER.addFilter(keep)
    argv = ["predict", "--model", esod_pt, "--source", src, "--mode", "dense", "--device", "cpu", "--no-save"]
    try:
        assert so_det(*argv, "--save-dir", tmp_path / "a", "--max-pixels", "10000") == 0
        assert any("above the budget of 0.01 MP (--max-pixels)" in m and "320x64" in m for m in seen)
        seen.clear()
        assert so_det(*argv, "--save-dir", tmp_path / "b") == 0  # 20480 px: under the default budget
        assert not any("--max-pixels" in m for m in seen)
    finally:
        LOGGER.removeFilter(keep)


def test_os_errors_name_their_path(esod_pt, tmp_path, capsys):
    src = write_images(tmp_path / "src", 1)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc = so_det("predict", "--model", esod_pt, "--source", src, *FAST, "--save-dir", blocker / "out")
    err = capsys.readouterr().err
    assert rc == 2 and str(blocker) in err and "Traceback" not in err


def test_merge_predictions_is_a_so_det_command(tmp_path):
    res = python("from so_det_ultra.cli import main; main(['merge-predictions', '--help'])", cwd=tmp_path)
    assert "SHARD_DIR" in res.stdout and "--force" in res.stdout


def test_a_model_that_fails_to_load_leaves_no_claim_on_the_save_dir(esod_pt, tmp_path, capsys):
    src, out = write_images(tmp_path / "src", 1), tmp_path / "out"
    rc = so_det("predict", "--model", tmp_path / "missing.pt", "--source", src, *FAST, "--save-dir", out)
    assert rc != 0 and "missing.pt" in capsys.readouterr().err
    assert not (out / jobs.JOB_FILE).exists()
    assert so_det("predict", "--model", esod_pt, "--source", src, *FAST, "--save-dir", out) == 0  # the retry runs
