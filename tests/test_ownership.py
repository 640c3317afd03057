"""A conversion never destroys a user's files: manifest, lock, path guards, permissions, errors a user can act on.

The rules are in docs/datasets.md ("Ownership, locking and overwriting") and :mod:`so_det_ultra.data.ownership`.
CLI runs go through :func:`so_det`, a child process importing the same ``so_det_ultra`` as this test process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from conftest import BIN, clean_env
from test_faults_convert import LOGS, image, killed, temp_files, visdrone_source

import so_det_ultra
from so_det_ultra.data import _io, visdrone
from so_det_ultra.data.ownership import LOCK_PID, MANIFEST, DestinationError, dst_lock

PACKAGE_ROOT = Path(so_det_ultra.__file__).resolve().parents[1]


def so_det(*args, cwd=None, wait=True):
    """``so-det ARGS`` in a child process (the package under test on its path); CompletedProcess or Popen."""
    cmd = [sys.executable, "-c", "import sys; from so_det_ultra.cli import main; sys.exit(main())", *map(str, args)]
    env = clean_env(PYTHONPATH=PACKAGE_ROOT)
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def digest(root: Path) -> dict:
    """``{relative path: sha256}`` of every file under ``root`` except the conversion logs (they hold run counts)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in LOGS
    }


def convert(src, dst, **kw):
    return visdrone.convert_visdrone(src, dst, show_progress=False, verbose=False, **kw)


def user_folder(dst: Path) -> dict:
    """A folder holding a user's own dataset: images, labels, another split and a data.yaml; returns its digest."""
    for rel, data in {
        "images/train/im0.jpg": b"the user's own image",
        "images/train/mine.jpg": b"another image of the user",
        "labels/train/mine.txt": b"0 0.5 0.5 0.1 0.1\n",
        "images/val/mine.png": b"user png",
        "data.yaml": b"path: mine\n",
    }.items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(data)
    return digest(dst)


# ------------------------------------------------------------------------------------------------------ ownership


def test_non_empty_dst_without_manifest_is_refused_and_kept(tmp_path):
    src, dst = visdrone_source(tmp_path / "src", n=3), tmp_path / "mydata"
    before = user_folder(dst)
    proc = so_det("convert", "visdrone", src, dst, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "not empty (data.yaml, images, labels)" in err and "--force" in err
    assert digest(dst) == before, "a refused conversion changed the user's folder"


def test_force_keeps_every_file_it_does_not_write(tmp_path):
    src, dst = visdrone_source(tmp_path / "src", n=3), tmp_path / "mydata"
    before = user_folder(dst)
    proc = so_det("convert", "visdrone", src, dst, "--no-progress", "--force")
    assert proc.returncode == 0, proc.stderr
    assert "stale files removed: 0" in proc.stdout
    assert "--force: existing files replaced by same-named output: 2" in proc.stdout  # im0.jpg and data.yaml
    after = digest(dst)
    for rel in ("images/train/mine.jpg", "labels/train/mine.txt", "images/val/mine.png"):
        assert after[rel] == before[rel], f"{rel} changed"
    assert after["images/train/im0.jpg"] != before["images/train/im0.jpg"]  # a name the conversion writes
    # a rerun from a source with fewer images removes only what a conversion wrote
    shutil.rmtree(src / "VisDrone2019-DET-train" / "images")
    (src / "VisDrone2019-DET-train" / "images").mkdir()
    image(src / "VisDrone2019-DET-train" / "images" / "im0.jpg", seed=0)
    s = convert(src, dst)
    assert s.stale_removed == 6  # im1, im2: image, label, sidecar
    left = digest(dst)
    for rel in ("images/train/mine.jpg", "labels/train/mine.txt", "images/val/mine.png"):
        assert left[rel] == before[rel], f"{rel} was removed or changed by a rerun"
    assert not (dst / "images" / "train" / "im1.jpg").exists()


def test_stale_files_only_from_the_manifest(tmp_path):
    """A converted folder the user added files to: a rerun deletes only files an earlier conversion wrote."""
    src, dst = visdrone_source(tmp_path / "src", n=4), tmp_path / "dst"
    convert(src, dst)
    (dst / "images" / "train" / "extra.jpg").write_bytes(b"added by the user")
    (dst / "labels" / "train" / "extra.txt").write_bytes(b"")
    for k in (2, 3):
        (src / "VisDrone2019-DET-train" / "images" / f"im{k}.jpg").unlink()
    s = convert(src, dst)
    assert s.stale_removed == 6
    assert (dst / "images" / "train" / "extra.jpg").read_bytes() == b"added by the user"
    assert (dst / "labels" / "train" / "extra.txt").exists()
    # a user's file with a name the conversion wants to write is refused, not overwritten
    (dst / "images" / "train" / "im2.jpg").write_bytes(b"user file with a converter's name")
    image(src / "VisDrone2019-DET-train" / "images" / "im2.jpg", seed=2)
    with pytest.raises(DestinationError, match=r"im2\.jpg exists and was not written by a conversion.*--force"):
        convert(src, dst)
    assert (dst / "images" / "train" / "im2.jpg").read_bytes() == b"user file with a converter's name"


def test_killed_late_then_early_keeps_ownership(tmp_path):
    """A run killed late, then a run with other options killed early: the last run still owns the first run's files
    (the journal of a killed run is kept in the manifest before the next run starts its own)."""
    src, dst = visdrone_source(tmp_path / "src", n=5), tmp_path / "dst"
    convert(src, dst, mask_ignored=True)
    want = digest(dst)
    shutil.rmtree(dst)
    cmd = [BIN / "so-det", "convert", "visdrone", src, dst, "--no-progress"]
    killed(cmd, 14, tmp_path)  # lock PID, manifest, then 12 of the 15 image/label/sidecar files
    killed([*cmd, "--mask-ignored"], 3, tmp_path)  # every image changes: killed at the first or second one
    convert(src, dst, mask_ignored=True)
    assert digest(dst) == want and not temp_files(dst)


def test_other_kind_manifest_is_refused(tmp_path):
    src, dst = visdrone_source(tmp_path / "src", n=2), tmp_path / "dst"
    convert(src, dst)
    manifest = (dst / MANIFEST).read_text().replace('"visdrone"', '"soda-d"')
    (dst / MANIFEST).write_text(manifest)
    with pytest.raises(DestinationError, match="holds a soda-d conversion"):
        convert(src, dst)


# ----------------------------------------------------------------------------------------------------------- lock


def _pair(dst, runs):
    """Single-run digests of ``runs`` (each the CLI arguments after DST) into ``dst``, then all of them at once."""
    want = []
    for src, *opts in runs:
        shutil.rmtree(dst, ignore_errors=True)
        convert(src, dst, mask_ignored="--mask-ignored" in opts)  # what the CLI runs
        want.append(digest(dst))
    shutil.rmtree(dst)
    procs = [so_det("convert", "visdrone", a[0], dst, *a[1:], "--no-progress", wait=False) for a in runs]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "Traceback" not in err
    assert not temp_files(dst) and not (dst / LOCK_PID).exists()
    return want, digest(dst)


@pytest.mark.parametrize("case", ["same-source", "two-sources", "masked-and-plain"])
def test_two_conversions_at_once_give_one_runs_result(tmp_path, case):
    """Two ``so-det convert`` into one DST at the same moment: one waits for the other; the tree is byte-identical
    to a single run's (of the run that finished last), never a mixture."""
    a = visdrone_source(tmp_path / "a", n=150)
    dst = tmp_path / "dst"
    if case == "same-source":
        runs = [(a,), (a,)]
    elif case == "two-sources":
        b = visdrone_source(tmp_path / "b", n=120)
        for p in (b / "VisDrone2019-DET-train" / "images").iterdir():
            image(p, seed=1000 + int(p.stem[2:]))  # other pixels, other names overlap
        runs = [(a,), (b,)]
    else:
        runs = [(a,), (a, "--mask-ignored")]
    want, got = _pair(dst, runs)
    assert got in want, f"{case}: the result is not one run's output"


def test_second_run_waits_then_converts(tmp_path):
    """While the lock is held, a conversion says which PID it waits for, then runs when the lock is released."""
    src, dst = visdrone_source(tmp_path / "src", n=2), tmp_path / "dst"
    log = tmp_path / "output.txt"
    with dst_lock(dst):
        with open(log, "w") as err:
            cmd = [sys.executable, "-c", "import sys; from so_det_ultra.cli import main; sys.exit(main())"]
            cmd += ["convert", "visdrone", str(src), str(dst), "--no-progress"]
            proc = subprocess.Popen(cmd, env=clean_env(PYTHONPATH=PACKAGE_ROOT), stdout=err, stderr=err)
        for _ in range(1200):  # up to 120 s for the child to start and reach the lock
            if f"is being written by PID {os.getpid()}; waiting" in log.read_text() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"did not wait: {log.read_text()[-2000:]}"
        assert not (dst / "images").exists()
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert len(list((dst / "labels" / "train").iterdir())) == 2


def test_lock_timeout_names_the_pid(tmp_path):
    src, dst = visdrone_source(tmp_path / "src", n=2), tmp_path / "dst"
    with dst_lock(dst):
        with pytest.raises(DestinationError, match=f"is being written by PID {os.getpid()}"):
            convert(src, dst, lock_timeout=0.2)
        proc = so_det("convert", "visdrone", src, dst, "--lock-timeout", "0.5", "--no-progress")
    assert proc.returncode == 2 and f"is being written by PID {os.getpid()}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "waiting for it to finish (at most 0.5 s)" in proc.stdout
    assert not (dst / "images").exists()
    assert convert(src, dst).images == {"train": 2}  # released: the next run goes through


def test_temp_files_of_a_live_process_are_kept(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        live = folder / f".a.jpg.{sleeper.pid}-00ff.tmp"
        gone = folder / f".a.jpg.{int(dead.stdout)}-00ff.tmp"
        mine = folder / f".b.txt.{os.getpid()}-0a0b.tmp"
        for p in (live, gone, mine):
            p.write_bytes(b"partial")
        assert _io.remove_temp(folder) == 1
        assert live.exists() and mine.exists() and not gone.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --------------------------------------------------------------------------------------------------------- guards


@pytest.mark.parametrize(
    "dst,words",
    [
        ("{src}", "must not be the source folder"),
        ("{src}/inner", "must not be the source folder"),
        ("{src}/VisDrone2019-DET-train/..", "must not be the source folder"),
        ("", "empty text"),
        ("{src}/..", "lies inside the output folder"),
    ],
    ids=["same", "inside", "same-resolved", "empty", "source-inside"],
)
def test_guards_refuse_before_writing(tmp_path, dst, words):
    src = visdrone_source(tmp_path / "src", n=2)
    before = digest(tmp_path)
    proc = so_det("convert", "visdrone", src, dst.format(src=src), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert digest(tmp_path) == before and not (tmp_path / "data.yaml").exists()


# ---------------------------------------------------------------------------------------------------- permissions


def test_written_files_follow_the_umask(tmp_path):
    src = visdrone_source(tmp_path / "src", n=3)
    for p in (src / "VisDrone2019-DET-train" / "images").iterdir():
        p.chmod(0o600)  # a copy must not inherit the source's mode
    old = os.umask(0o022)
    try:
        convert(src, tmp_path / "plain")
        convert(src, tmp_path / "masked", mask_ignored=True)
    finally:
        os.umask(old)
    for root in (tmp_path / "plain", tmp_path / "masked"):
        modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}
        assert len(modes) == 3 * 3 + 4  # + data.yaml, log, manifest, lock
        assert set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items() if v != 0o644}


# --------------------------------------------------------------------------------------------------------- errors


def _png_header(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims ``w`` x ``h`` pixels (Pillow refuses it at open: a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_as_the_only_image_says_why(tmp_path):
    src = visdrone_source(tmp_path / "src", n=1)
    split = src / "VisDrone2019-DET-train"
    (split / "images" / "im0.jpg").unlink()
    _png_header(split / "images" / "im0.png", 30000, 30000)
    proc = so_det("convert", "visdrone", src, tmp_path / "dst", "--no-progress")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "nothing converted" in err, err
    assert f"{split / 'images' / 'im0.png'}: image too large to decode safely" in err
    assert "convert-visdrone.log" in err


def _zip_with_link(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        link = zipfile.ZipInfo("VisDrone2019-DET-val/images")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/tmp")
        z.writestr("VisDrone2019-DET-val/images/a.jpg", b"x")
        z.writestr("VisDrone2019-DET-val/annotations/a.txt", b"")


def test_zip_with_a_symlink_member_is_one_clear_line(tmp_path):
    (tmp_path / "dl").mkdir()
    archive = tmp_path / "dl" / "VisDrone2019-DET-val.zip"
    _zip_with_link(archive)
    proc = so_det("convert", "visdrone", tmp_path / "dl", tmp_path / "dst", "--no-progress")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{archive}: member 'VisDrone2019-DET-val/images' is a symbolic link" in err and "unzip it yourself" in err
    assert not (tmp_path / "dst" / ".extract").exists()


def test_os_errors_keep_their_path(monkeypatch, capsys):
    from so_det_ultra.cli import main
    from so_det_ultra.data import cli as data_cli

    def fails(**_):
        err = FileNotFoundError(2, "No such file or directory")
        err.filename = "/data/out/.im0.jpg.123-ab.tmp"  # str(err) does not show it
        raise err

    monkeypatch.setattr(data_cli, "_visdrone", lambda: fails)
    assert main(["convert", "visdrone", "s", "d"]) == 2
    assert "No such file or directory: '/data/out/.im0.jpg.123-ab.tmp'" in capsys.readouterr().err

    def denied(**_):
        err = PermissionError(13, "Permission denied")
        err.filename = "/data/out"
        raise err

    monkeypatch.setattr(data_cli, "_synthetic", lambda: denied)
    assert main(["synthetic", "x"]) == 1
    assert capsys.readouterr().err.strip() == "so-det synthetic: error: [Errno 13] Permission denied: '/data/out'"


@pytest.mark.parametrize(
    "args,words",
    [
        (["--nc", "0"], "--nc (classes) must be 1..6"),
        (["--imgsz", "0"], "--imgsz (image side, px) must be at least 8"),
        (["--sizes", "nan", "4"], "--sizes MIN MAX (object side, px) needs finite"),
        (["--sizes", "4", "inf"], "--sizes MIN MAX (object side, px) needs finite"),
        (["--train", "-3"], "--train (images) must be 0 or more"),
        (["--val", "-1"], "--val (images) must be 0 or more"),
        (["--objects", "5", "2"], "--objects MIN MAX"),
    ],
)
def test_synthetic_rejects_bad_options(tmp_path, capsys, args, words):
    from so_det_ultra.cli import main

    assert main(["synthetic", str(tmp_path / "ds"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("so-det synthetic: error: ") and words in err, err
    assert not (tmp_path / "ds").exists()
