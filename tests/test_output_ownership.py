"""Every folder so-det-ultra writes is owned, locked and replaced all or nothing (docs/datasets.md, "Ownership,
locking and overwriting"): converters, ``so-det synthetic``, ``so-det predict`` save folders and sparse exports.

- links: nothing is written, deleted or unpacked through a link below the output folder, nor through linked
  bookkeeping files or planted temporary names;
- users' files: never overwritten without ``--force``, never deleted; ``--force`` replaces only what the run writes;
- one job per folder: a second run waits for the lock; resume only with the same weights and output options;
- all or nothing: a run that fills the disk leaves the earlier output intact and names the file it could not write.

Disk-full cases run on a small tmpfs (root only; skipped elsewhere with the reason) and, everywhere, with a write
that raises ``ENOSPC``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import BIN, clean_env
from test_faults_convert import soda_source, temp_files, tree, visdrone_source

from so_det_ultra.cli import main
from so_det_ultra.data import _io, soda, visdrone
from so_det_ultra.data.ownership import BOOKKEEPING, JOURNAL, DestinationError
from so_det_ultra.data.synthetic import make_dataset

FAST = ["--mode", "sparse", "--thr", "0", "--conf", "0.000001", "--max-det", "5", "--device", "cpu"]


def convert(src, dst, **kw):
    return visdrone.convert_visdrone(src, dst, show_progress=False, verbose=False, **kw)


def files(root: Path) -> dict:
    """``{relative path: bytes or link target}`` of everything under ``root`` (links not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def so_det(capsys, *args) -> tuple[int, str]:
    """``so-det ARGS`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two untrained 3-class so-det-esod-n checkpoints with different weights."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        y = YOLO("so-det-esod-n.yaml")
        y.model = DetectionModel("so-det-esod-n.yaml", nc=3, verbose=False)
        y.model.names = {0: "a", 1: "b", 2: "c"}
        y.save(str(root / f"m{seed}.pt"))
        out.append(root / f"m{seed}.pt")
    return out


def images(folder: Path, n: int, shape=(48, 64)) -> Path:
    """``n`` noise JPEGs ``im<k>.jpg`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        cv2.imwrite(str(folder / f"im{k}.jpg"), (rng.random((*shape, 3)) * 255).astype(np.uint8))
    return folder


# ------------------------------------------------------------------------------------------------ small disk


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only): ``fill(leave)`` then takes all but ``leave`` bytes of it."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs, which needs root to mount")
    d = tmp_path / "disk"
    d.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of ``disk`` with a filler file."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "ab") as f:
        f.write(b"\0" * max(free - leave, 0))


# ======================================================================================================= links


def test_rerun_into_a_linked_split_folder_leaves_the_source_alone(tmp_path):
    """DST/images/train replaced by a link to the source images: no rerun writes through it (a link of every image
    to itself, masked copies over the originals)."""
    src, dst = visdrone_source(tmp_path / "src", n=3), tmp_path / "dst"
    convert(src, dst)
    shutil.rmtree(dst / "images" / "train")
    os.symlink(src / "VisDrone2019-DET-train" / "images", dst / "images" / "train")
    before = files(src)
    for opts in ({"images": "symlink"}, {"mask_ignored": True}):
        with pytest.raises(DestinationError, match=r"images/train is a symbolic link"):
            convert(src, dst, **opts)
    assert files(src) == before


def test_new_dst_holding_only_a_link_to_the_source_is_refused(tmp_path):
    src, dst = visdrone_source(tmp_path / "src", n=2), tmp_path / "dst"
    dst.mkdir()
    os.symlink(src / "VisDrone2019-DET-train", dst / "images")
    before = files(src)
    with pytest.raises(DestinationError, match=r"not empty \(images\)"):
        convert(src, dst)
    with pytest.raises(DestinationError, match="is a symbolic link"):
        convert(src, dst, force=True)
    assert files(src) == before


@pytest.mark.parametrize("name", BOOKKEEPING)
def test_linked_bookkeeping_files_are_refused_not_written_through(tmp_path, name):
    src, dst = visdrone_source(tmp_path / "src", n=1), tmp_path / "dst"
    convert(src, dst)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (dst / name).unlink(missing_ok=True)
    os.symlink(victim, dst / name)
    with pytest.raises(DestinationError, match=f"{name}.*symbolic link"):
        convert(src, dst)
    assert victim.read_text() == "the user's file"


def test_predict_temporary_names_are_unpredictable(models, tmp_path, capsys):
    """A link planted at the name the last version wrote job.json through is never followed."""
    src, out = images(tmp_path / "src", 1), tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    for stem, suffix in (("job", ".json"), ("predictions", ".json"), ("im0", ".jpg")):
        os.symlink(victim, out / f".{stem}.{os.getpid()}.tmp{suffix}")
    argv = ["predict", "--model", models[0], "--source", src, *FAST, "--save-dir", out, "--save-json", "--force"]
    assert so_det(capsys, *argv)[0] == 0
    assert victim.read_text() == "the user's file" and not (out / "job.json").is_symlink()


def _zip_split(src: Path, archive: Path) -> None:
    shutil.make_archive(str(archive.with_suffix("")), "zip", src, "VisDrone2019-DET-train")


def test_a_users_extract_folder_is_never_touched(tmp_path):
    """Archives unpack into a work folder of the run's own: a user's ``DST/.extract`` (a folder, or a link) stays."""
    unpacked = visdrone_source(tmp_path / "unpacked", n=2)
    src = tmp_path / "zips"
    src.mkdir()
    _zip_split(unpacked, src / "VisDrone2019-DET-train.zip")
    dst = tmp_path / "dst"
    convert(src, dst)
    (dst / ".extract").mkdir()
    (dst / ".extract" / "notes.txt").write_text("mine")
    assert convert(src, dst).images == {"train": 2}
    assert (dst / ".extract" / "notes.txt").read_text() == "mine"
    shutil.rmtree(dst / ".extract")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, dst / ".extract")
    assert convert(src, dst).images == {"train": 2}
    assert list(elsewhere.iterdir()) == [] and (dst / ".extract").is_symlink()
    assert not [p for p in dst.iterdir() if p.name.startswith(".extract.")], "the work folder was not removed"


@pytest.mark.parametrize("mode", ["symlink", "copy"])
def test_images_from_archives_never_link_into_the_removed_work_folder(tmp_path, mode):
    """The work folder is removed after the run: an image unpacked there is hardlinked into DST, never symlinked."""
    unpacked = visdrone_source(tmp_path / "unpacked", n=2)
    src = tmp_path / "zips"
    src.mkdir()
    _zip_split(unpacked, src / "VisDrone2019-DET-train.zip")
    dst = tmp_path / "dst"
    assert convert(src, dst, images=mode).images == {"train": 2}
    images = sorted((dst / "images" / "train").iterdir())
    assert len(images) == 2 and not [p for p in images if p.is_symlink()]
    assert all(cv2.imread(str(p)) is not None for p in images)


def test_an_output_that_appears_while_merging_is_kept_without_force(tmp_path, monkeypatch):
    """merge-predictions checks OUT first, then writes: a file another run writes there meanwhile is never replaced
    without --force (the rename is a hard link, which fails on any existing name); a dangling link counts too."""
    from so_det_ultra.highres import jobs

    out = tmp_path / "merged.json"
    real = _io.write_temp

    def racing(path, data):
        Path(path).write_text("another run's merge")  # the other run finishes between the check and the rename
        return real(path, data)

    monkeypatch.setattr(_io, "write_temp", racing)
    with pytest.raises(jobs.JobError, match=r"merged\.json exists .* it is kept"):
        jobs.write_predictions(out, [], replace=False)
    assert out.read_text() == "another run's merge" and not temp_files(tmp_path)
    monkeypatch.setattr(_io, "write_temp", real)
    jobs.write_predictions(out, [], replace=True)
    assert json.loads(out.read_text()) == []
    link = tmp_path / "link.json"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(FileExistsError):
        _io.atomic_write_bytes(link, b"[]", replace=False)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists() and not temp_files(tmp_path)


def test_soda_full_image_sidecars_are_owned(tmp_path):
    """The full image's sidecar beside its tiles: a user's file of that name is refused, and a stale one removed."""
    src, dst = soda_source(tmp_path / "SODA-D"), tmp_path / "dst"
    opts = dict(splits=("train",), tile_splits=("train",), show_progress=False, verbose=False)
    soda.convert_soda(src, dst, **{**opts, "splits": ("val",)})
    (dst / "sidecars" / "train").mkdir(parents=True)
    (dst / "sidecars" / "train" / "a.json").write_text("the user's notes")
    with pytest.raises(DestinationError, match=r"sidecars/train/a\.json exists and was not written by a conversion"):
        soda.convert_soda(src, dst, **opts)
    assert (dst / "sidecars" / "train" / "a.json").read_text() == "the user's notes"
    (dst / "sidecars" / "train" / "a.json").unlink()
    soda.convert_soda(src, dst, **opts)
    assert (dst / "sidecars" / "train" / "a.json").is_file()
    coco = json.loads((src / "Annotations" / "train.json").read_text())
    coco["images"] = [im for im in coco["images"] if im["file_name"] != "a.jpg"]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 1]
    (src / "Annotations" / "train.json").write_text(json.dumps(coco))
    soda.convert_soda(src, dst, **opts)
    assert not (dst / "sidecars" / "train" / "a.json").exists(), "a stale full-image sidecar was kept"


def test_synthetic_owns_its_folder(tmp_path, capsys):
    """``so-det synthetic`` refuses a dataset it did not write, and replaces a linked label file, not its target."""
    root = tmp_path / "mine"
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("path: mine\n")
    (root / "labels" / "train" / "train_00000.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    before = files(root)
    rc, err = so_det(capsys, "synthetic", root, "--train", "2", "--val", "1", "--imgsz", "32", "--sizes", "4", "8")
    assert rc == 2 and "not empty (data.yaml, labels)" in err and len(err.splitlines()) == 1
    assert files(root) == before
    ours = tmp_path / "ours"
    kw = dict(n_train=2, n_val=1, imgsz=32, size_range=(4.0, 8.0))
    make_dataset(ours, **kw)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (ours / "labels" / "train" / "train_00000.txt").unlink()
    os.symlink(victim, ours / "labels" / "train" / "train_00000.txt")
    make_dataset(ours, **kw)
    assert victim.read_text() == "the user's file"
    assert not (ours / "labels" / "train" / "train_00000.txt").is_symlink()


# ============================================================================================= predict folders


@pytest.mark.parametrize(
    "content,words",
    [
        ("not json at all", "not a job file of so-det predict"),
        ("[1, 2]", "holds a JSON list, not a job object"),
        ('{"signature": null}', "has no job signature"),
        ('{"my": "settings"}', "has no job signature"),
    ],
    ids=["text", "list", "null-signature", "foreign-object"],
)
def test_a_job_file_that_is_not_a_job_is_refused(models, tmp_path, capsys, content, words):
    src, out = images(tmp_path / "src", 1), tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text(content)
    rc, err = so_det(capsys, "predict", "--model", models[0], "--source", src, *FAST, "--save-dir", out)
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert (out / "job.json").read_text() == content


def test_force_replaces_only_what_the_new_job_writes(models, tmp_path, capsys):
    """``--force`` over another job: a model that fails to load leaves that job whole; a user's records stay."""
    src, out = images(tmp_path / "src", 2), tmp_path / "out"
    base = ["predict", "--source", src, *FAST, "--save-dir", out, "--save-json"]
    assert so_det(capsys, *base, "--model", models[0])[0] == 0
    (out / "results" / "mine.json").write_text('{"my": "notes"}')
    earlier = files(out)
    broken = tmp_path / "broken.pt"
    broken.write_text("not a checkpoint")
    rc, err = so_det(capsys, *base, "--model", broken, "--force")
    assert rc == 2 and "broken.pt" in err
    assert {k: v for k, v in files(out).items() if not k.startswith(".so-det")} == {
        k: v for k, v in earlier.items() if not k.startswith(".so-det")
    }
    assert so_det(capsys, *base, "--model", models[0], "--resume")[0] == 0  # the earlier job is still whole
    assert so_det(capsys, *base, "--model", models[1], "--force")[0] == 0
    assert (out / "results" / "mine.json").read_text() == '{"my": "notes"}'


def test_files_added_after_a_run_are_not_overwritten_by_the_same_job(models, tmp_path, capsys):
    src, out = images(tmp_path / "src", 1), tmp_path / "out"
    base = ["predict", "--model", models[0], "--source", src, *FAST, "--save-dir", out]
    assert so_det(capsys, *base, "--no-save", "--save-json")[0] == 0
    (out / "im0.jpg").write_bytes(b"the user's image")
    (out / "labels").mkdir()
    (out / "labels" / "im0.txt").write_text("the user's labels")
    for outputs in (["--no-save", "--save-txt"], ["--save-json"]):  # labels added; annotated copies added
        rc, err = so_det(capsys, *base, *outputs)
        assert rc == 2 and "exists and was not written by so-det predict" in err, err
    assert (out / "im0.jpg").read_bytes() == b"the user's image"
    assert (out / "labels" / "im0.txt").read_text() == "the user's labels"


def test_resume_needs_the_same_weights_not_just_the_same_path(models, tmp_path, capsys):
    src, out, model = images(tmp_path / "src", 1), tmp_path / "out", tmp_path / "best.pt"
    shutil.copyfile(models[0], model)
    base = ["predict", "--model", model, "--source", src, *FAST, "--save-dir", out, "--save-json", "--no-save"]
    assert so_det(capsys, *base)[0] == 0
    shutil.copyfile(models[1], model)  # retrained: new weights at the same path
    rc, err = so_det(capsys, *base, "--resume")
    assert rc == 2 and "another job" in err and "weights" in err


def test_weights_are_hashed_again_only_when_the_file_changed(models, tmp_path, monkeypatch):
    """The content hash is kept with the file's size and times: an unchanged file is not read again; a file replaced
    with its old modification time restored is."""
    from so_det_ultra.highres import jobs

    model = tmp_path / "best.pt"
    shutil.copy2(models[0], model)
    first = jobs.weights_digest(model)
    reads = []
    real = jobs._hash_file
    monkeypatch.setattr(jobs, "_hash_file", lambda p, h: reads.append(p) or real(p, h))
    assert jobs.weights_digest(model, first) == first and reads == []
    shutil.copyfile(models[1], model)
    os.utime(model, ns=(first["mtime_ns"], first["mtime_ns"]))
    assert jobs.weights_digest(model, first)["sha256"] != first["sha256"] and reads == [model]


def test_resume_with_other_output_options_is_refused(models, tmp_path, capsys):
    """``--save-txt`` added on resume would give labels to the new inputs only: refused, with what to do."""
    src, out = images(tmp_path / "src", 1), tmp_path / "out"
    base = ["predict", "--model", models[0], "--source", src, *FAST, "--save-dir", out]
    assert so_det(capsys, *base)[0] == 0
    images(src, 2)  # a second input arrives
    rc, err = so_det(capsys, *base, "--resume", "--save-txt")
    assert rc == 2 and "--resume: 1 input(s) done before were written with other output options" in err, err
    assert not (out / "labels").exists()
    assert so_det(capsys, *base, "--save-txt")[0] == 0  # without --resume every input gets its labels
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["im0.txt", "im1.txt"]


def _wait_for(proc, words: str) -> str:
    """Read ``proc``'s output until a line holds ``words`` or the process ends; the output read."""
    seen = ""
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], 600)
        assert ready, f"no output for 600 s: {seen[-2000:]}"
        line = proc.stdout.readline()
        seen += line
        if not line or words in line:
            return seen


def test_two_jobs_into_one_folder_at_once_never_mix(models, tmp_path, capsys, monkeypatch):
    """Job A holds the save folder (stopped while its model loads); job B (another model, ``--force``) starts in
    another process: it waits for A's lock naming A's PID, then replaces A's results. The folder ends as B alone
    would leave it, never with A's records under B's job file."""
    from so_det_ultra.highres import engines

    src = images(tmp_path / "src", 2)
    common = ["--source", src, *FAST, "--save-json", "--no-save"]
    assert so_det(capsys, "predict", "--model", models[1], *common, "--save-dir", tmp_path / "alone")[0] == 0
    alone = json.loads((tmp_path / "alone" / "predictions.json").read_text())

    out, loading, go, rc_a = tmp_path / "out", threading.Event(), threading.Event(), []
    opened = engines.open_predictor

    def held(*args, **kwargs):
        loading.set()
        assert go.wait(600)
        return opened(*args, **kwargs)

    monkeypatch.setattr(engines, "open_predictor", held)
    a = threading.Thread(
        target=lambda: rc_a.append(
            main(["predict", "--model", str(models[0]), *map(str, common), "--save-dir", str(out)])
        )
    )
    a.start()
    try:
        assert loading.wait(600)
        cmd = [BIN / "so-det", "predict", "--model", models[1], *common, "--save-dir", out, "--force"]
        b = subprocess.Popen(
            list(map(str, cmd)),
            env=clean_env(PYTHONUNBUFFERED=1),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        seen = _wait_for(b, "is being written by PID")
    finally:
        go.set()
        a.join(600)
    seen += b.communicate(timeout=600)[0]
    assert f"is being written by PID {os.getpid()}; waiting" in seen, seen[-3000:]
    assert rc_a == [0] and b.returncode == 0, seen[-3000:]
    assert json.loads((out / "job.json").read_text())["signature"]["model"] == str(models[1])
    assert json.loads((out / "predictions.json").read_text()) == alone


# ============================================================================================= export folders


@pytest.fixture(scope="module")
def export(models, tmp_path_factory):
    """A sparse ONNX export of ``models[0]``."""
    from so_det_ultra.highres.export import export_sparse

    return export_sparse(models[0], "onnx", out=tmp_path_factory.mktemp("export") / "sparse")


def test_export_force_replaces_links_never_writes_through_them(models, export, tmp_path):
    from so_det_ultra.highres.export import export_sparse

    out = tmp_path / "sparse"
    shutil.copytree(export, out, symlinks=True)
    (out / "notes.txt").write_text("the user's notes")
    victims = {}
    for name in ("metadata.json", "stem.onnx"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("the user's file")
        (out / name).unlink()
        os.symlink(victims[name], out / name)
    export_sparse(models[0], "onnx", out=out, force=True)
    assert all(v.read_text() == "the user's file" for v in victims.values())
    assert not (out / "metadata.json").is_symlink() and (out / "notes.txt").read_text() == "the user's notes"
    json.loads((out / "metadata.json").read_text())


def _export_failing_late(monkeypatch):
    """Make the second ONNX graph of an export fail as a full disk does."""
    from so_det_ultra.highres import export as export_module

    real = export_module._export_onnx

    def full(module, args, path, inputs, outputs):
        if "output0" in outputs:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(module, args, path, inputs, outputs)

    monkeypatch.setattr(export_module, "_export_onnx", full)


def test_a_failed_export_keeps_the_earlier_one(models, export, tmp_path, monkeypatch):
    """ENOSPC while the new graphs are written (simulated): the earlier export is byte for byte intact."""
    from so_det_ultra.highres.export import export_sparse

    out = tmp_path / "sparse"
    shutil.copytree(export, out)
    before = files(out)
    _export_failing_late(monkeypatch)
    with pytest.raises(OSError) as err:
        export_sparse(models[1], "onnx", out=out, force=True)
    after = files(out)
    assert {k: v for k, v in after.items() if k != JOURNAL} == {k: v for k, v in before.items() if k != JOURNAL}
    assert re.search(r"No space left on device: '.*rest\.onnx'; the earlier export in .* is intact", str(err.value))


def test_a_first_export_that_failed_can_be_retried_without_force(models, tmp_path, monkeypatch):
    """A failed first export leaves only its bookkeeping (manifest, lock): the retry needs no ``--force``, and a
    folder holding anything else is still refused."""
    from so_det_ultra.highres.export import export_sparse, is_sparse_export

    out = tmp_path / "sparse"
    with monkeypatch.context() as m:
        _export_failing_late(m)
        with pytest.raises(OSError, match="nothing was exported"):
            export_sparse(models[1], "onnx", out=out)
    assert out.is_dir() and not is_sparse_export(out)
    assert export_sparse(models[1], "onnx", out=out) == out and is_sparse_export(out)
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        export_sparse(models[1], "onnx", out=out)


def test_an_export_that_fills_the_disk_keeps_the_earlier_one(export, small_disk, tmp_path):
    """``--force`` with a bigger model (so-det-esod-s) over a good export, on a disk with too little room."""
    from ultralytics import YOLO

    from so_det_ultra.highres.export import export_sparse

    bigger = tmp_path / "s.pt"
    YOLO("so-det-esod-s.yaml").save(str(bigger))
    out = small_disk / "sparse"
    shutil.copytree(export, out)
    before = files(out)
    fill(small_disk, leave=(export / "stem.onnx").stat().st_size // 2)
    with pytest.raises(OSError) as err:
        export_sparse(bigger, "onnx", out=out, force=True)
    assert {k: v for k, v in files(out).items() if k != JOURNAL} == {k: v for k, v in before.items() if k != JOURNAL}
    assert re.search(r"No space left on device: '.*\.onnx'; the earlier export in .* is intact", str(err.value))
    assert not temp_files(out)


# ==================================================================================================== full disk


def _masked_rerun(tmp_path, dst: Path, fail) -> tuple[dict, str]:
    """Convert 12 images, then rerun with ``--mask-ignored`` while ``fail()`` makes the disk full; (tree, error).

    The source images are 160x120 noise JPEGs of quality 20, so their masked copies (quality 95) are several times
    larger: the rerun needs room the disk does not have.
    """
    src = visdrone_source(tmp_path / "src", n=12)
    rng = np.random.default_rng(0)
    for p in (src / "VisDrone2019-DET-train" / "images").iterdir():
        noise = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        cv2.imwrite(str(p), noise, [cv2.IMWRITE_JPEG_QUALITY, 20])
    convert(src, dst)
    before = tree(dst)
    fail()
    with pytest.raises(OSError) as err:
        convert(src, dst, mask_ignored=True)
    (dst / JOURNAL).unlink()  # the failed run's claims, read by the next run
    return before, str(err.value)


def test_a_rerun_that_fills_the_disk_keeps_the_earlier_conversion(tmp_path, small_disk):
    dst = small_disk / "dst"
    before, err = _masked_rerun(tmp_path, dst, lambda: fill(small_disk, leave=24 * 1024))
    assert tree(dst) == before and not temp_files(dst)
    assert "No space left on device: " in err and str(dst) in err and "holds what it held before" in err, err


def test_a_rerun_that_fails_half_way_keeps_the_earlier_conversion(tmp_path, monkeypatch):
    """The same with writes that raise ENOSPC from the sixth file on (on any machine)."""
    n = [0]

    def full():
        n[0] += 1
        if n[0] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")

    dst = tmp_path / "dst"
    before, err = _masked_rerun(tmp_path, dst, lambda: monkeypatch.setattr(_io, "_fault_point", full))
    assert tree(dst) == before and not temp_files(dst)
    assert f"No space left on device: '{dst / 'images' / 'train'}" in err, err


def test_a_video_that_fills_the_disk_is_not_moved_in(models, tmp_path, small_disk, capsys):
    """A rerun whose annotated video cannot be finished keeps the earlier video and names the file."""
    src = tmp_path / "src"
    src.mkdir()
    writer = cv2.VideoWriter(str(src / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    rng = np.random.default_rng(0)
    for _ in range(12):
        writer.write(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    writer.release()
    out = small_disk / "out"
    argv = ["predict", "--model", models[0], "--source", src, *FAST, "--save-dir", out]
    assert so_det(capsys, *argv)[0] == 0
    earlier = (out / "clip.mp4").read_bytes()
    fill(small_disk, leave=(len(earlier) // 3) & ~4095)
    rc, err = so_det(capsys, *argv)
    assert (out / "clip.mp4").read_bytes() == earlier and not temp_files(out)
    assert rc == 2 and "No space left on device" in err and "clip.mp4" in err, err


def test_a_full_disk_while_saving_images_names_the_file(models, tmp_path, small_disk, capsys):
    src, out = images(tmp_path / "src", 1, shape=(480, 640)), small_disk / "out"  # an annotated copy of ~400 kB
    fill(small_disk, leave=64 * 1024)
    rc, err = so_det(capsys, "predict", "--model", models[0], "--source", src, *FAST, "--save-dir", out)
    assert rc == 2 and "No space left on device" in err and "unknown suffix" not in err, err
    assert str(out) in err and len(err.strip().splitlines()) == 1


# ========================================================================================== errors a user acts on


def test_dst_that_is_a_file_and_bad_lock_timeouts_are_one_line(tmp_path, capsys):
    src = visdrone_source(tmp_path / "src", n=1)
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = so_det(capsys, "convert", "visdrone", src, afile, "--no-progress")
    assert rc == 2 and "is a file, not a folder" in err and "Errno" not in err, err
    for bad in ("-1", "inf", "nan"):
        rc, err = so_det(capsys, "convert", "visdrone", src, tmp_path / "dst", "--no-progress", "--lock-timeout", bad)
        assert rc == 2 and "--lock-timeout must be a finite number of seconds >= 0" in err, (bad, err)
    assert not (tmp_path / "dst").exists()
