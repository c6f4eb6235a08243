"""Downloading and unpacking public datasets (only where the license allows a direct download).

Every archive is an :class:`Archive`: its URL (https where the host offers it) and, where a sum is
published, its SHA-256 and size. A download is verified before it is used, and so is an archive
kept from an earlier run before it is reused: a wrong size or SHA-256, or an archive that does not
unpack (a truncated zip or tar), is deleted and reported in one line, so a bad file is never used
twice. Archives unpack into a temporary folder beside their destination and are moved into place
only when complete, so an interrupted or failed unpacking leaves no half dataset behind.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from torch.hub import download_url_to_file

from pixelwise.errors import UserError
from pixelwise.runtime import show_progress


@dataclass(frozen=True)
class Archive:
    """A dataset archive: where it is and, where published, what it must be."""

    url: str
    sha256: str | None = None  # None: no published sum (the archive is still checked when it unpacks)
    size: int | None = None  # bytes
    filename: str | None = None  # name to save it under (default: the URL's last part)

    @property
    def name(self) -> str:
        return self.filename or self.url.rsplit("/", 1)[-1]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _corrupt(path: Path, why: str) -> UserError:
    """Delete ``path`` (a bad download) and say so; the next run downloads it afresh."""
    path.unlink(missing_ok=True)
    return UserError(f"{path}: {why}; deleted it, run again to download it afresh")


def verify(path: Path, archive: Archive) -> None:
    """Raise (after deleting ``path``) unless it has the archive's size and SHA-256, where known."""
    if archive.size is not None and path.stat().st_size != archive.size:
        raise _corrupt(path, f"{path.stat().st_size} bytes, but {archive.url} has {archive.size}")
    if archive.sha256 is not None:
        found = file_sha256(path)
        if found != archive.sha256.lower():
            raise _corrupt(path, f"SHA-256 {found} does not match the published {archive.sha256}")


def download_file(archive: Archive, dest: Path) -> Path:
    """``archive`` at ``dest``: downloaded if absent (into a temporary file renamed at the end, so an
    interrupted download leaves nothing), verified either way."""
    dest = Path(dest)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(archive.url, str(dest), progress=show_progress())
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
            dest.unlink(missing_ok=True)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{archive.url}: download failed ({reason}); download it by hand into "
                            f"{dest.parent}") from None
        # the user's umask, as for any file they write: older torch releases download through a
        # NamedTemporaryFile, whose 0600 survives the rename
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(dest, 0o666 & ~umask)
    verify(dest, archive)
    return dest


def _safe_tar_members(tf: tarfile.TarFile, archive: Path, into: Path) -> list[tarfile.TarInfo]:
    """The members of ``tf``, refusing any that would land outside ``into`` or are links or
    devices (what ``filter="data"`` refuses, for Pythons older than 3.10.12 that lack it)."""
    members = tf.getmembers()
    for m in members:
        if not (m.isfile() or m.isdir()) or not (into / m.name).resolve().is_relative_to(into):
            raise UserError(f"{archive}: unsafe member {m.name!r} in archive; not extracting")
    return members


def _unpack(archive: Path, into: Path) -> None:
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (into / member).resolve().is_relative_to(into):
                    raise UserError(f"{archive}: unsafe path {member!r} in archive; not extracting")
            zf.extractall(into)
    elif ".tar" in name or name.endswith(".tgz"):
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                try:
                    tf.extractall(into, filter="data")
                except tarfile.FilterError as e:  # a TarError, but not a damaged archive
                    raise UserError(f"{archive}: unsafe member in archive ({e}); not extracting") from None
            else:
                tf.extractall(into, members=_safe_tar_members(tf, archive, into))
    else:
        raise UserError(f"{archive}: unknown archive type; unpack it by hand into {into}")


def _merge(src: Path, dst: Path) -> None:
    """Move the tree ``src`` into ``dst``; what already exists in ``dst`` is kept."""
    for child in src.iterdir():
        target = dst / child.name
        if not target.exists():
            shutil.move(str(child), str(target))
        elif target.is_dir() and child.is_dir():
            _merge(child, target)


def extract(archive: Path, into: Path) -> None:
    """Unpack a .tar/.tar.gz/.zip into ``into``, refusing members that would land outside it. It
    unpacks into a temporary folder first; an archive that does not unpack is deleted."""
    into = Path(into).resolve()
    into.mkdir(parents=True, exist_ok=True)
    work = into / f".{archive.name}.unpacking"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        _unpack(archive, work)
        _merge(work, into)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _corrupt(archive, f"not a complete archive ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def download_and_extract(archive: Archive, root: Path) -> None:
    """Download ``archive`` into ``root`` (verified; kept for reuse) and unpack it there."""
    root = Path(root)
    extract(download_file(archive, root / archive.name), root)
