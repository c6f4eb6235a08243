"""The README's guarantees (issue 11), one test per finding: runs are never clobbered and nothing is
written before every check passes; SIGTERM saves like Ctrl-C and resume continues exactly; files
get the user's umask; sparse labels are a dataset problem and eval checks its data; downloads are
verified and a bad one is deleted; the decompression-bomb limit is a flag; progress bars only on a
terminal; eval records where its numbers came from; dependency floors match the code."""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from pixelwise import create_model, runtime, save_checkpoint
from pixelwise.cli import main
from pixelwise.data import build_dataset
from pixelwise.data import download as dl
from pixelwise.data import io as pio
from pixelwise.errors import UserError
from pixelwise.runtime import check_can_create, check_device, show_progress, signals_ignored

ROOT = Path(__file__).resolve().parents[1]
KW = {"base_channels": 4, "batch_norm": True, "dropout": 0.0}
TINY = ["--model", "unet", "--dataset", "shapes", "--batch-size", "4", "--no-progress", "--schedule", "constant",
        "--model-kwargs", json.dumps(KW), "--dataset-kwargs", '{"num_train": 8, "num_val": 4, "size": 32}']


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> its SHA-256 (plus its permission bits): a snapshot."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished one-epoch run."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_checkpoint(path, create_model("unet", num_classes=4, **KW), {"model": "unet", "num_classes": 4,
                                                                       "model_kwargs": KW})
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixelwise: error: "), err
    return err[0]


# --- runs are never clobbered ---------------------------------------------------------------------
def test_an_existing_run_is_refused_without_resume_or_overwrite(run_dir, capsys):
    before = tree(run_dir)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert tree(run_dir) == before  # not even config.yaml


def test_overwrite_replaces_the_earlier_run_files_only(run_dir, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("best.safetensors", "last.safetensors", "last.state.safetensors", "metrics.csv", "metrics.json",
                 "config.yaml"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "old.events").write_text("old")
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "tensorboard").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 1
    assert main(["train", *TINY, "--out", str(out), "--overwrite", "--resume"]) == 2
    assert "give only one of them" in one_error_line(capsys)


def test_a_failed_resume_writes_nothing(run_dir, tmp_path, capsys):
    before = tree(run_dir)
    # the run picked best.safetensors by mIoU: resuming by another metric is refused after reading the state
    assert main(["train", *TINY, "--epochs", "2", "--out", str(run_dir), "--resume", "--select-by", "pixel_acc"]) == 2
    assert "picked best.safetensors by mIoU" in one_error_line(capsys)
    assert tree(run_dir) == before
    empty = tmp_path / "new"
    assert main(["train", *TINY, "--out", str(empty), "--resume"]) == 2
    assert "cannot resume" in one_error_line(capsys) and not empty.exists()


def test_bad_settings_fail_before_the_data_is_read_or_out_created(tmp_path, monkeypatch, capsys):
    from pixelwise.engine import trainer

    monkeypatch.setattr(trainer, "open_datasets", lambda cfg: pytest.fail("the data was opened"))
    for extra, message in [(["--model-kwargs", '{"base_chanels": 4}'], "did you mean 'base_channels'?"),
                           (["--model-kwargs", '{"padding": "full"}'], "padding must be 'same' or 'valid'"),
                           (["--pretrained", "nope.pth"], "--pretrained 'nope.pth': no such file"),
                           (["--class-weights", "w.json"], "class weights file w.json not found")]:
        assert main(["train", "--model", "unet", "--out", str(tmp_path / "o"), *extra]) == 2
        assert message in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_demo_refuses_an_earlier_demo_without_overwrite(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    assert "already holds a run" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# --- SIGTERM ----------------------------------------------------------------------------------------
def _train(out: Path, epochs: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    args = [*TINY[:-1], '{"num_train": 48, "num_val": 4, "size": 32}']  # 12 steps an epoch
    return subprocess.Popen([sys.executable, "-m", "pixelwise", "train", *args, "--epochs", str(epochs),
                             "--out", str(out), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_sigterm_saves_the_current_step_exits_143_and_resume_is_exact(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, 5000)  # cannot finish before the signal, even on a starved machine
    end = time.monotonic() + 180
    while not (out / "last.state.safetensors").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < end
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere inside epoch 2
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]  # stdout is a pipe here: the line also says what was saved
    assert last.startswith("pixelwise: terminated (SIGTERM); saved ") and "--resume --out" in last
    assert "interrupted: saved" in stdout
    from safetensors import safe_open

    with safe_open(str(out / "last.state.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["pixelwise_train_state"])
    epochs = meta["epoch"] + 1  # finish the epoch it was in (the constant schedule does not depend on the length)
    done = _train(out, epochs, "--resume")
    assert done.wait(timeout=600) == 0, done.communicate()[1][-2000:]
    straight = tmp_path / "straight"
    ref = _train(straight, epochs)
    assert ref.wait(timeout=600) == 0
    a, b = load_file(out / "last.safetensors"), load_file(straight / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].double() - b[k].double()).abs().max().item() <= 1e-5, k


def test_held_signals_wait_for_the_end_of_the_step():
    from pixelwise.runtime import HeldSignals

    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append("handled"))
    try:
        held = HeldSignals()
        held.hold()
        signal.raise_signal(signal.SIGTERM)
        seen.append("step finished")
        held.release()
        assert seen == ["step finished", "handled"]
        assert signal.getsignal(signal.SIGTERM) is not held._record  # the handler is back
    finally:
        signal.signal(signal.SIGTERM, old)


# --- files get the user's umask ---------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_get_umask_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.safetensors", create_model("unet", num_classes=2, **KW),
                        {"model": "unet", "num_classes": 2, "model_kwargs": KW})
    finally:
        os.umask(old)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == mode


def test_every_file_train_and_predict_write_gets_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
        image = tmp_path / "in" / "a.png"
        image.parent.mkdir()
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
        assert main(["predict", "--checkpoint", str(tmp_path / "run" / "best.safetensors"), str(image),
                     "--out", str(tmp_path / "pred"), "--uncertainty"]) == 0
    finally:
        os.umask(old)
    written = [p for p in [*(tmp_path / "run").rglob("*"), *(tmp_path / "pred").rglob("*")] if p.is_file()]
    assert len(written) >= 8  # checkpoints, training state, metrics, config, masks, overlays
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o640" for p in written}


def test_a_download_gets_the_umask(tmp_path, monkeypatch):
    """torch.hub's downloads went through a NamedTemporaryFile (mode 0600) in older releases."""
    import shutil
    import tempfile

    def old_torch_download(url, dst, progress=True):
        with tempfile.NamedTemporaryFile(delete=False, dir=Path(dst).parent) as f:
            f.write(Path(url.removeprefix("file://")).read_bytes())
        shutil.move(f.name, dst)

    monkeypatch.setattr(dl, "download_url_to_file", old_torch_download)
    src = _zip(tmp_path / "d.zip")
    old = os.umask(0o022)
    try:
        dl.download_file(dl.Archive(src.as_uri()), tmp_path / "root" / "d.zip")
    finally:
        os.umask(old)
    assert (tmp_path / "root" / "d.zip").stat().st_mode & 0o777 == 0o644


# --- datasets --------------------------------------------------------------------------------------
def folder_dataset(root: Path, labels: list[int]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = label
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


def test_sparse_labels_far_above_the_rest_are_a_problem(tmp_path):
    root = folder_dataset(tmp_path / "d", [1, 1, 200, 1, 1, 1])
    ds = build_dataset("folder", str(root), "all")
    assert ds.num_classes == 2  # not 201 classes of which 198 never occur
    problems = ds.check()
    assert len(problems) == 1 and problems[0].path.endswith("s2.png")
    assert "label values 200 outside the 2 classes" in problems[0].message
    assert "classes.json" in problems[0].message and "num_classes=201" in problems[0].message
    assert build_dataset("folder", str(root), "all", num_classes=201).check() == []  # said so: fine
    assert build_dataset("folder", str(folder_dataset(tmp_path / "e", [1, 3, 2])), "all").num_classes == 4


def test_eval_checks_the_data_like_train_and_skip_invalid_leaves_files_out(tmp_path, capsys):
    root = folder_dataset(tmp_path / "d", [1, 1, 200, 1, 1, 1])
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, create_model("unet", num_classes=2, **KW), {"model": "unet", "num_classes": 2,
                                                                      "model_kwargs": KW})
    args = ["eval", "--checkpoint", str(ckpt), "--dataset", "folder", "--data", str(root), "--split", "all",
            "--no-bf"]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "1 problem(s)" in line and "s2.png" in line and "--skip-invalid" in line
    out = tmp_path / "m.json"
    assert main([*args, "--skip-invalid", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 5 and len(result["provenance"]["dataset"]["skipped"]) == 1


def test_train_names_the_problems_of_both_splits_at_once(tmp_path, capsys):
    """A bad file in each split was told one split at a time: fix the train split's, run again, and
    only then hear of the val split's."""
    from pixelwise.data.folder import val_stems

    stems = [f"s{i}" for i in range(20)]
    held = val_stems(stems)
    bad = [next(s for s in stems if s in held), next(s for s in stems if s not in held)]  # one of each split
    root = folder_dataset(tmp_path / "d", [200 if f"s{i}" in bad else 1 for i in range(20)])
    args = ["train", "--model", "unet", "--dataset", "folder", "--data", str(root), "--epochs", "1",
            "--model-kwargs", json.dumps(KW), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert "problems in both splits: 1 in the train split of FolderDataset" in line, line
    assert "1 in the val split of FolderDataset" in line and all(f"{s}.png" in line for s in bad)
    assert not (tmp_path / "run").exists()
    assert main([*args, "--out", str(tmp_path / "run2"), "--skip-invalid"]) == 0


# --- downloads --------------------------------------------------------------------------------------
def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/images/a.txt", "pixels" * 100)
    return path


def test_a_verified_download_unpacks_and_is_reused(tmp_path):
    src = _zip(tmp_path / "d.zip")
    archive = dl.Archive(src.as_uri(), sha256=hashlib.sha256(src.read_bytes()).hexdigest(), size=src.stat().st_size)
    dl.download_and_extract(archive, tmp_path / "root")
    assert (tmp_path / "root" / "data" / "images" / "a.txt").is_file()
    assert not list((tmp_path / "root").glob(".*"))  # no temporary folder left
    src.unlink()  # the kept archive is verified and reused, not fetched again
    dl.download_and_extract(archive, tmp_path / "root")


@pytest.mark.parametrize("damage", ["hash", "size", "truncated zip", "truncated tar.gz", "tar cut at a member"])
def test_a_bad_download_is_deleted_reported_in_one_line_and_never_reused(tmp_path, capsys, monkeypatch, damage):
    if damage == "tar cut at a member":  # a plain tar cut where a member ends reads as a shorter archive
        good = tmp_path / "d.tar"
        with tarfile.open(good, "w") as tf:
            for k in range(4):
                (tmp_path / f"{k}.bin").write_bytes(os.urandom(3072))
                tf.add(tmp_path / f"{k}.bin", arcname=f"data/{k}.bin")
    elif damage == "truncated tar.gz":
        good = tmp_path / "d.tar.gz"
        (tmp_path / "f.bin").write_bytes(os.urandom(50_000))
        with tarfile.open(good, "w:gz") as tf:
            tf.add(tmp_path / "f.bin", arcname="data/f.bin")
    else:
        good = _zip(tmp_path / "d.zip")
    data = good.read_bytes()
    src = tmp_path / "src" / good.name
    src.parent.mkdir()
    if damage == "tar cut at a member":
        with tarfile.open(good) as tf:
            cut = tf.getmembers()[2].offset  # where the third member's header begins
    src.write_bytes(data[:cut] if damage == "tar cut at a member" else
                    data[: len(data) // 2] if damage.startswith("truncated") else data)
    archive = dl.Archive(src.as_uri(), sha256="0" * 64 if damage == "hash" else None,
                         size=len(data) + 1 if damage == "size" else None)
    root = tmp_path / "root"
    with pytest.raises(UserError, match="deleted it, run again to download it afresh") as e:
        dl.download_and_extract(archive, root)
    assert "\n" not in str(e.value) and str(root / good.name) in str(e.value)
    assert [p.name for p in root.iterdir()] == []  # neither the archive nor half a dataset
    # the next run downloads afresh (here: the good file) instead of reusing the bad one
    src.write_bytes(data)
    fixed = dl.Archive(src.as_uri(), sha256=hashlib.sha256(data).hexdigest())
    dl.download_and_extract(fixed, root)
    assert any(root.rglob("data/*"))


def test_a_failed_download_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"download failed .*download it by hand and save it as .*missing.zip"):
        dl.download_and_extract(dl.Archive((tmp_path / "missing.zip").as_uri()), tmp_path / "root")
    assert not list((tmp_path / "root").iterdir())


def test_download_once_lets_one_process_fetch_and_the_others_find_the_data(tmp_path):
    """torchrun's ranks (or two runs on one folder) each downloaded and unpacked into one shared
    work folder, each wiping it first: ADE20K was left with 1147 of 2000 images, for good."""
    import threading
    import time

    fetched = []

    def fetch():
        fetched.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the others to arrive while it works
        (tmp_path / "data").mkdir()

    threads = [threading.Thread(target=dl.download_once, args=(tmp_path, "d.zip", (tmp_path / "data").is_dir, fetch))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fetched) == 1 and (tmp_path / "data").is_dir()


def test_two_unpackings_at_once_each_complete(tmp_path):
    """Both unpacked into one fixed work folder and each wiped it: files went missing."""
    import threading

    src = tmp_path / "d.zip"
    with zipfile.ZipFile(src, "w") as zf:
        for k in range(300):
            zf.writestr(f"data/{k}.txt", os.urandom(2000))
    errors = []

    def unpack(into):
        try:
            dl.extract(src, into)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=unpack, args=(tmp_path / "root",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(list((tmp_path / "root" / "data").iterdir())) == 300
    assert not list((tmp_path / "root").glob(".*"))


def test_a_silent_server_fails_the_download_instead_of_hanging(tmp_path, monkeypatch):
    """No timeout was set anywhere: a connection that went quiet waited forever."""
    import socket

    from pixelwise import runtime

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts (through the backlog) and never answers
    monkeypatch.setattr(dl, "network_timeout", lambda: runtime.network_timeout(0.5))
    try:
        with pytest.raises(UserError, match="download failed .*timed out"):
            dl.download_file(dl.Archive(f"http://127.0.0.1:{server.getsockname()[1]}/d.zip"), tmp_path / "d.zip")
    finally:
        server.close()
    assert socket.getdefaulttimeout() is None  # put back


@pytest.mark.parametrize("error, words", [
    (http.client.IncompleteRead(b""), "download failed (IncompleteRead"),
    (OSError(errno.ENOSPC, "No space left on device"), "cannot write {dest} (No space left on device); free some"),
])
def test_a_cut_transfer_and_a_full_disk_are_one_line_that_says_which(tmp_path, monkeypatch, error, words):
    """A chunked transfer cut short was a raw http.client traceback; a full disk was 'download
    failed ...; download it by hand into' the same full folder."""
    def fails(url, dst, progress=True):
        raise error

    monkeypatch.setattr(dl, "download_url_to_file", fails)
    dest = tmp_path / "d.zip"
    with pytest.raises(UserError) as e:
        dl.download_file(dl.Archive("https://example.org/d.zip"), dest)
    assert words.format(dest=dest) in str(e.value)


def test_an_archive_placed_by_hand_with_another_sum_is_renamed_aside_not_deleted(tmp_path):
    """The offline message says to place the archive by hand; one that differed (another mirror's
    copy) was deleted (1-2 GB) with 'run again to download it afresh', which loops offline."""
    placed = _zip(tmp_path / "d.zip")
    data = placed.read_bytes()
    with pytest.raises(UserError, match="renamed it to d.zip.bad: put the published archive at"):
        dl.download_and_extract(dl.Archive("https://example.org/d.zip", sha256="0" * 64), tmp_path)
    assert (tmp_path / "d.zip.bad").read_bytes() == data and not placed.exists()


@pytest.mark.parametrize("python", ["with tarfile's data filter", "older than 3.10.12"])
def test_tar_members_outside_the_folder_are_refused_on_every_python(tmp_path, monkeypatch, python):
    import io

    if python.startswith("older"):
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tf:
        info = tarfile.TarInfo("data/a.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    dl.extract(good, tmp_path / "root")
    assert (tmp_path / "root" / "data" / "a.txt").read_bytes() == b"abc"
    for name, kind in [("../evil.txt", tarfile.REGTYPE), ("data/link", tarfile.SYMTYPE)]:
        bad = tmp_path / f"bad{kind!r}.tar"
        with tarfile.open(bad, "w") as tf:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            info.size = 0
            tf.addfile(info, io.BytesIO(b""))
        with pytest.raises(UserError, match="not extracting"):
            dl.extract(bad, tmp_path / "root2")
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "root2" / "data").exists()


def test_dataset_archives_are_https_and_pinned_where_published():
    from pixelwise.data import ade20k, camvid, voc

    for archive in (voc.ARCHIVE, ade20k.ARCHIVE, camvid.ARCHIVE):
        assert archive.url.startswith("https://"), archive.url
    assert voc.ARCHIVE.sha256 == "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb"
    assert ade20k.ARCHIVE.sha256 == "7ff1be44964418441f542a7cc1e1a650e7dc0fc275f5d23252bc9bbdbc977b29"
    assert camvid.ARCHIVE.sha256 is None  # GitHub's generated zip: no published sum


def test_published_weights_are_hash_checked(monkeypatch):
    from pixelwise import weights
    from pixelwise.backbones import resnet, vgg

    seen = {}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: seen.setdefault(url, kw) and {})
    for url in [*resnet.URLS.values(), *vgg.URLS.values()]:
        assert weights.url_has_hash(url), url
        weights.download_weights(url)
        assert seen[url]["check_hash"] is True and seen[url]["weights_only"] is True


def test_a_failed_download_leaves_one_line(monkeypatch, capsys):
    """torch.hub's 'Downloading: ...' line came before the error when no terminal shows progress."""
    import sys
    from urllib.error import URLError

    from pixelwise import weights

    def offline(url, **kw):
        sys.stderr.write(f'Downloading: "{url}" to /cache/x.pth\n')
        raise URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(weights, "show_progress", lambda: False)
    with pytest.raises(UserError, match=r"could not download weights from https://x/y-abcdef12.pth \(<urlopen "
                                        r"error Name or service not known>\); .* --pretrained PATH"):
        weights.download_weights("https://x/y-abcdef12.pth")
    assert capsys.readouterr().err == ""


# --- decompression bombs -----------------------------------------------------------------------------
def test_max_pixels_is_a_deliberate_flag_and_the_default_stays_safe(checkpoint, tmp_path, capsys):
    image = tmp_path / "in" / "big.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(image)
    try:
        pio.set_max_image_pixels(64 * 80 - 1)  # a small stand-in for PIL's 89-megapixel default
        with pytest.raises(UserError, match=r"80x64 = 5,120 pixels is above the limit .* pass --max-pixels 5120"):
            pio.read_image(image)
        with pytest.raises(UserError, match="--max-pixels 5120"):
            pio.probe(image)
    finally:
        pio.set_max_image_pixels(None)
    assert pio.max_image_pixels() == pio.DEFAULT_MAX_PIXELS == 89_478_485 == Image.MAX_IMAGE_PIXELS
    # the flag sets the limit for this one command, and the default is back after it
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "o1"),
                 "--max-pixels", "5119"]) == 2
    assert "pass --max-pixels 5120" in one_error_line(capsys)
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "o"),
                 "--max-pixels", "5120"]) == 0
    assert (tmp_path / "o" / "big.png").is_file()
    assert pio.max_image_pixels() == pio.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "o2"),
                 "--max-pixels", "0"]) == 2
    assert "--max-pixels must be a positive number" in one_error_line(capsys)


def test_the_max_pixels_fix_the_message_offers_works_in_train_and_data_inspect(tmp_path, capsys, monkeypatch):
    """``train`` and ``data inspect`` read images too: the flag the refusal names is theirs as well."""
    root = folder_dataset(tmp_path / "d", [1, 1, 1, 1])  # 16 x 16 = 256-pixel images
    out = tmp_path / "run"
    train = ["train", "--model", "unet", "--dataset", "folder", "--data", str(root), "--train-split", "all",
             "--val-split", "all", "--epochs", "1", "--batch-size", "2", "--out", str(out), "--no-progress",
             "--model-kwargs", '{"base_channels": 4}']
    monkeypatch.setattr(pio, "DEFAULT_MAX_PIXELS", 255)  # as if 16 x 16 were a bomb
    try:
        assert main(["data", "inspect", "--dataset", "folder", "--data", str(root), "--split", "all"]) == 0
        assert "pass --max-pixels 256" in capsys.readouterr().out
        assert main(train) == 2
        assert "pass --max-pixels 256" in one_error_line(capsys) and not out.exists()
        assert main(["data", "inspect", "--dataset", "folder", "--data", str(root), "--split", "all",
                     "--max-pixels", "256"]) == 0
        assert "problems: none" in capsys.readouterr().out
        assert main([*train, "--max-pixels", "256"]) == 0
        assert yaml.safe_load((out / "config.yaml").read_text())["max_pixels"] == 256  # and so --resume reads it
    finally:
        monkeypatch.undo()
        pio.set_max_image_pixels(None)


def test_a_bomb_over_twice_the_limit_names_the_flag(tmp_path):
    image = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(image)
    try:
        pio.set_max_image_pixels(100)  # PIL itself refuses above twice its limit
        with pytest.raises(UserError, match=r"10,000 pixels is above the limit of 100 .*--max-pixels 10000"):
            pio.read_mask(image)
    finally:
        pio.set_max_image_pixels(None)


# --- progress bars --------------------------------------------------------------------------------------
def test_progress_bars_only_on_a_terminal_or_when_asked(capfd):
    args = ["data", "inspect", "--dataset", "shapes", "--split", "val", "--dataset-kwargs",
            '{"num_val": 3, "size": 16}']
    assert main(args) == 0  # stderr is not a terminal here: no bar, no carriage returns
    assert "\r" not in capfd.readouterr().err
    assert main([*args, "--progress"]) == 0
    assert "\r" in capfd.readouterr().err
    from pixelwise.runtime import show_progress

    class Tty:
        def isatty(self):
            return True

    assert show_progress(None, Tty()) and not show_progress(False, Tty()) and not show_progress(None)


def test_progress_defaults_to_whether_stderr_is_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert show_progress() and show_progress(None) and not show_progress(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not show_progress() and show_progress(True)


def test_signals_ignored_puts_back_the_handlers_in_place_before():
    def handler(signum, frame):
        pass

    before = signal.signal(signal.SIGINT, handler)
    try:
        with signals_ignored():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_every_progress_bar_comes_from_the_one_helper():
    uses = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "pixelwise").rglob("*.py")
            if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert uses == ["src/pixelwise/runtime.py"]
    hub = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "pixelwise").rglob("*.py")
           if "progress=True" in p.read_text()]
    assert hub == []  # torch.hub's downloads draw bars too


# --- eval provenance ----------------------------------------------------------------------------------------
def test_eval_json_records_where_its_numbers_came_from(checkpoint, tmp_path):
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "shapes", "--split", "test", "--no-bf",
                 "--tile", "16", "--tta", "--json", str(out), "--dataset-kwargs", '{"num_test": 2, "size": 32}']) == 0
    p = json.loads(out.read_text())["provenance"]
    assert p["checkpoint"] == str(checkpoint.resolve())
    assert p["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert p["dataset"] == {"kind": "shapes", "root": None, "split": "test", "options": {"num_test": 2, "size": 32},
                            "skipped": []}
    assert p["prediction"] == {"resize": "native", "mode": "eager", "tile": 16, "overlap": 0.25, "tta": "flip",
                               "mc_samples": 0, "crf": None}
    assert p["pixelwise_version"] == __import__("pixelwise").__version__ and p["torch_version"] == torch.__version__


# --- dependency floors ------------------------------------------------------------------------------------------
def _floors(block: str = "dependencies") -> dict[str, str]:
    """name -> floor of every requirement in pyproject.toml's ``dependencies`` or an extra such as
    ``dev``, as pip reads it on this Python (a requirement whose marker names another Python, such
    as the export extra's onnxruntime for 3.10, is left out)."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] if block == "dependencies" else project["optional-dependencies"][block]
    floors = {}
    for text in listed:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        floors |= {req.name.lower(): s.version for s in req.specifier if s.operator == ">="}
    return floors


def test_constraints_min_pins_every_floor_of_pyproject():
    pins = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    # CI installs ".[dev]" (serve and export included) with these
    floors = _floors() | _floors("serve") | _floors("export") | _floors("dev")
    assert {k: v for k, v in pins.items() if k != "torch"} == {k: v for k, v in floors.items() if k != "torch"}
    assert pins["torch"] == "2.13.0"  # the only torch that installs here without a CUDA download (README)


def test_directly_imported_packages_are_declared():
    imported = set()
    for p in (ROOT / "src" / "pixelwise").rglob("*.py"):
        imported |= set(re.findall(r"^\s*(?:import|from) (\w+)", p.read_text(), re.M))
    declared = set(_floors()) | {"pyyaml"}
    names = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "PIL": "pillow"}
    third_party = {"cv2", "yaml", "PIL", "numpy", "torch", "safetensors", "tqdm", "albumentations", "pycocotools",
                   "scipy"}
    assert {names.get(m, m) for m in imported & third_party} <= declared
    assert "opencv-python-headless" in declared


# --- files a verb writes: never one of the user's without being told ------------------------------
def test_a_json_report_is_written_beside_the_data_but_never_into_it_nor_over_a_file(checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 90 * i, np.uint8)).save(data / "images" / f"c{i}.png")
        Image.fromarray(np.full((16, 16), i, np.uint8)).save(data / "masks" / f"c{i}.png")
    args = ["eval", "--checkpoint", str(checkpoint), "--dataset", "folder", "--data", str(data), "--split", "all",
            "--no-bf", "--dataset-kwargs", '{"num_classes": 4}', "--json"]
    before = tree(data)
    for inside in ("images/c7.jpg", "masks/new.json", "splits/train.txt", "classes.json"):
        assert main([*args, str(data / inside)]) == 2
        assert "is inside the input folder" in one_error_line(capsys)
    assert tree(data) == before
    assert main([*args, str(data / "eval.json")]) == 0  # a report directly in the dataset's root is read by no reader
    capsys.readouterr()
    assert main([*args, str(data / "eval.json")]) == 2
    assert "exists; pass --overwrite to replace it" in one_error_line(capsys)
    assert main([*args, str(data / "eval.json"), "--overwrite"]) == 0
    assert json.loads((data / "eval.json").read_text())["num_images"] == 2


@pytest.mark.parametrize("verb", [["data", "inspect"], ["eval", "--predictions", "preds"]])
@pytest.mark.parametrize("where", ["in the data folder", "elsewhere"])
def test_a_json_report_never_replaces_the_annotation_file_it_read(tmp_path, capsys, monkeypatch, verb, where):
    """A COCO-format set's annotation file (ann_file=) is an input, so --json naming it is refused even
    with --overwrite, as the checkpoint is. Directly in --data it passed as the one place a report may
    go, and one elsewhere was not compared at all: the report replaced the annotations, exit 0."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (tmp_path / "preds").mkdir()
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(data / "images" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]],
                             "area": 256, "bbox": [4, 4, 16, 16], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "box"}]}
    ann = data / "val.json" if where == "in the data folder" else tmp_path / "ann" / "val.json"
    ann.parent.mkdir(exist_ok=True)
    ann.write_text(json.dumps(coco))
    option = "{split}.json" if where == "in the data folder" else str(tmp_path / "ann" / "{split}.json")
    before = tree(tmp_path)
    assert main([*verb, "--dataset", "coco", "--data", str(data), "--split", "val", "--dataset-kwargs",
                 json.dumps({"ann_file": option, "image_dir": "images"}), "--json", str(ann), "--overwrite"]) == 2
    assert "would write over the input" in one_error_line(capsys)
    assert tree(tmp_path) == before


def test_json_naming_the_checkpoint_by_another_name_of_the_same_file_is_refused(checkpoint, tmp_path, capsys):
    """--json was compared with the inputs by path only: another name of the same file (another
    case on a case-insensitive file system, a bind mount, here a hard link) passed, and with
    --overwrite the report replaced the checkpoint's bytes where the name was the same file."""
    import os

    alias = tmp_path / "alias.safetensors"
    os.link(checkpoint, alias)
    before = checkpoint.read_bytes()
    assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "shapes", "--data", "none",
                 "--json", str(alias), "--overwrite"]) == 2
    assert "would write over the input" in one_error_line(capsys)
    assert checkpoint.read_bytes() == before and alias.read_bytes() == before


def test_a_folder_that_refuses_a_trial_file_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    """os.access trusts the mode bits, which root, read-only mounts and sysfs do not honour: a real
    trial file in the folder decides (here its creation fails as a read-only file system does)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["bench", "--model", "unet", "--size", "32", "--json", str(tmp_path / "b.json")]) == 2
    line = one_error_line(capsys)
    assert "cannot write in" in line and "Read-only file system" in line
    assert not (tmp_path / "b.json").exists()
    # predict too (it named its own temporary file, after the first image had been predicted)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "a.png"), "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"pixelwise: error: --out {tmp_path / 'p'}: cannot write in {tmp_path}"), line
    assert "Read-only file system" in line and not (tmp_path / "p").exists()


def test_running_out_of_main_memory_is_one_line(monkeypatch, capsys):
    import pixelwise.inference.bench as bench

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 119997600012 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(bench, "benchmark", allocate)
    assert main(["bench", "--model", "unet", "--size", "32"]) == 2
    line = one_error_line(capsys)
    assert "out of memory in main memory" in line and "smaller" in line


def test_settings_given_for_a_stage_that_uses_them_are_accepted(tmp_path, capsys):
    """instance_context set in the stage that crops instances, gamma with a step schedule: used, so
    accepted; the same with nothing to act on is refused (test_bad_inputs), and sync_bn in one
    process is a note, since a GPU recipe may set it."""
    config = tmp_path / "staged.yaml"
    config.write_text(yaml.safe_dump({"schedule": "step", "gamma": 0.5, "milestones": [1], "sync_bn": True,
                                      "stages": [{"epochs": 1, "instance_crops": True, "instance_context": 1.5,
                                                  "crop": "24x24"},
                                                 {"epochs": 1}]}))
    args = [a for a in TINY if a not in ("--schedule", "constant")]  # the YAML's step schedule, not TINY's
    assert main(["train", *args, "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert "note: sync_bn does nothing in one process" in capsys.readouterr().out
    assert main(["train", *TINY, "--config", str(config), "--out", str(tmp_path / "constant")]) == 2
    assert "milestones [1] acts only with schedule step" in one_error_line(capsys)


# --- other systems: encodings, file systems without locks, Windows' mapped files ----------------------
def test_text_files_are_read_as_utf8_with_or_without_a_bom(tmp_path):
    """classes.json, class-weight files and COCO annotation files were read in the locale's
    encoding (Straße -> StraÃŸe on Windows) and refused with a BOM (Notepad, PowerShell 5)."""
    from pixelwise.data.coco import COCOInstances
    from pixelwise.engine.trainer import read_class_weights

    bom = "\ufeff"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    (tmp_path / "classes.json").write_text(bom + json.dumps({"names": ["Straße", "水"]}, ensure_ascii=False),
                                           encoding="utf-8")
    assert build_dataset("folder", str(tmp_path), "all").class_names == ["Straße", "水"]
    (tmp_path / "w.json").write_text(bom + "[1.0, 2.5]", encoding="utf-8")
    (tmp_path / "w.txt").write_text(bom + "1.0 2.5", encoding="utf-8")
    for name in ("w.json", "w.txt"):
        assert list(read_class_weights(str(tmp_path / name), 2)) == [1.0, 2.5]
    coco = tmp_path / "coco"
    (coco / "val2017").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(coco / "val2017" / "café.png")
    data = {"images": [{"id": 1, "file_name": "café.png", "width": 8, "height": 8}], "annotations": [],
            "categories": [{"id": 1, "name": "Straße"}]}
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_val2017.json").write_text(bom + json.dumps(data, ensure_ascii=False),
                                                                 encoding="utf-8")
    ds = COCOInstances(coco, "val")
    assert ds.class_names == ["background", "Straße"] and ds.load(0).image.shape == (8, 8, 3)


def test_training_runs_on_a_file_system_without_locks(tmp_path, monkeypatch):
    """A flock that fails for want of locks (Lustre without flock, SMB, NFS without lockd) was read
    as 'in use by another pixelwise train': no training could start there."""
    import fcntl

    from pixelwise.data.download import download_once
    from pixelwise.engine.trainer import lock_out

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert lock_out(tmp_path) is not None  # runs, unlocked
    fetched = []
    download_once(tmp_path, "d.zip", lambda: False, lambda: fetched.append(1))
    assert fetched == [1]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps")
def test_a_resumed_run_does_not_keep_its_state_file_mapped(tmp_path):
    """The loaded optimizer tensors kept last.state.safetensors memory-mapped for the whole resumed
    run; Windows refuses to replace a mapped file, so the first save after a resume failed."""
    from pixelwise.checkpoint import load_train_state, save_train_state

    model = create_model("unet", num_classes=2, base_channels=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    path = tmp_path / "last.state.safetensors"
    save_train_state(path, model, opt, None, {}, {})
    kept = load_train_state(path, model, opt, None)
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert kept is not None


def test_a_console_that_cannot_encode_a_class_name_gets_an_escape_not_a_traceback(tmp_path):
    """eval and data inspect stopped with UnicodeEncodeError when stdout was cp1252 (a Windows
    console or redirect) and a class name was not, and eval's --json was lost with it."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"names": ["背景", "道路"]}))
    proc = subprocess.run([sys.executable, "-m", "pixelwise", "data", "inspect", "--dataset", "folder", "--data",
                           str(tmp_path), "--split", "all"], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"\\u80cc\\u666f" in proc.stdout and b"Traceback" not in proc.stderr


def test_a_drive_that_is_not_there_is_refused_not_looped_on(monkeypatch):
    """check_can_create walked up to the nearest existing folder; a Windows drive or share root is
    its own parent, so an unmapped Z: looped forever."""
    from pixelwise.runtime import check_can_create

    class Root(type(Path())):  # a path whose root does not exist, as an unmapped drive
        def exists(self, **kw):
            return False

    with pytest.raises(UserError, match="does not exist .* give another path"):
        check_can_create(Root("/nowhere/preds/run"), "--out /nowhere/preds/run")


# --- runtime: the device asked for, the write probe, progress on a closed stream ------------------
@pytest.mark.parametrize(("cuda_version", "why"), [(None, "this torch build has no CUDA"),
                                                    ("12.1", "no CUDA GPU is visible")])
def test_cuda_without_a_gpu_says_whether_the_build_or_the_machine_lacks_it(monkeypatch, cuda_version, why):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    with pytest.raises(UserError, match=rf"^--device cuda:1: {why} \(torch .*\); use --device cpu$"):
        check_device("cuda:1")
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("name", "message"), [("gpu", "--device 'gpu' is not a device; use cpu or cuda"),
                                               ("meta", "--device meta: pixelwise runs on cpu or cuda")])
def test_a_device_that_is_not_cpu_or_cuda_is_one_line(name, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_device(name)


def test_an_out_folder_that_is_a_broken_link_is_named_as_one(tmp_path, capsys):
    """A link to a folder that is not there, as --out (or a folder above it): check_can_create walked
    past it to its writable parent, and the mkdir then said "File exists"."""
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone")
    for out in (link, link / "a"):
        with pytest.raises(UserError, match=f"^--out {re.escape(str(out))}: {re.escape(str(link))} is a broken "
                                            r"symbolic link \(it points to .*gone, which does not exist\); fix "):
            check_can_create(out, f"--out {out}")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # a loop is not "a link to something that does not exist"
    with pytest.raises(UserError, match=f"{re.escape(str(loop))} is a symbolic link loop \\(it points to "
                                        f"{re.escape(str(loop))}, which leads back to it\\); fix the link"):
        check_can_create(loop / "a", "--out")
    from pixelwise.cli import main

    assert main(["train", "--model", "unet", "--dataset", "shapes", "--epochs", "1", "--out", str(link),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a broken symbolic link" in err, err
    assert not (tmp_path / "gone").exists() and link.is_symlink()


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    check_can_create(tmp_path / "a" / "b", "--out a/b")
    check_can_create(tmp_path, "--out .")
    assert list(tmp_path.iterdir()) == []  # neither the missing folders nor the probe file


def test_a_closed_stderr_means_no_progress_bars():
    closed = io.StringIO()
    closed.close()
    assert show_progress(None, closed) is False


@pytest.mark.parametrize(("available", "supported", "native"), [(True, False, False), (False, True, False),
                                                                 (True, True, True)])
def test_unknown_cpu_flags_ask_onednn_only_where_it_is_built_in(monkeypatch, available, supported, native):
    """Without /proc/cpuinfo's flags the answer is oneDNN's: yes only where oneDNN is there and says yes."""
    monkeypatch.setattr(runtime, "cpu_flags", set)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: available)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
    assert runtime.cpu_has_native_bf16() is native
