"""Downloading and unpacking public datasets (only where the license allows a direct download).

Every archive is an :class:`Archive`: its URL (https where the host offers it) and, where a sum is
published, its SHA-256 and size. A download is verified before it is used, and so is an archive
kept from an earlier run before it is reused: a wrong size or SHA-256, or an archive that does not
unpack (a truncated zip or tar), is deleted and reported in one line, so a bad file is never used
twice (an archive this run did not download, such as one placed by hand, is renamed aside rather
than deleted). Archives unpack into a temporary folder beside their destination and are moved into
place only when complete, so an interrupted or failed unpacking leaves no half dataset behind. A
plain tar cut at a member boundary is caught by its missing end-of-archive blocks. One process at
a time downloads and unpacks a dataset into one folder (:func:`download_once`, a file lock on
POSIX systems): torchrun's ranks and two runs started together on one folder wait for each other.
A connection that stays silent for a minute fails the download (:func:`pixelwise.runtime.network_timeout`).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.hub import download_url_to_file

from pixelwise.errors import UserError
from pixelwise.runtime import network_timeout, show_progress

try:  # POSIX: one process at a time unpacks a dataset (download_once)
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None  # type: ignore[assignment]

# errors of writing the local file, not of the network: the advice is about the disk, not the download
LOCAL_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EFBIG, errno.EPERM}


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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _corrupt(path: Path, why: str, ours: bool = True) -> UserError:
    """Delete ``path`` (a bad download) and say so; the next run downloads it afresh. A file this
    run did not download (``ours=False``: placed by hand, or kept from an earlier run) is renamed
    aside to ``<name>.bad`` instead: it may be the user's only copy."""
    if ours:
        path.unlink(missing_ok=True)
        return UserError(f"{path}: {why}; deleted it, run again to download it afresh")
    aside = path.with_name(path.name + ".bad")
    path.replace(aside)
    return UserError(f"{path}: {why}; renamed it to {aside.name}: put the published archive at {path} (or remove "
                     "it, and the next run downloads it)")


def verify(path: Path, archive: Archive, ours: bool = True) -> None:
    """Raise (after deleting ``path``, or renaming it aside where it is not ``ours``: see
    :func:`_corrupt`) unless it has the archive's size and SHA-256, where known."""
    if archive.size is not None and path.stat().st_size != archive.size:
        raise _corrupt(path, f"{path.stat().st_size} bytes, but {archive.url} has {archive.size}", ours)
    if archive.sha256 is not None:
        found = file_sha256(path)
        if found != archive.sha256.lower():
            raise _corrupt(path, f"SHA-256 {found} does not match the published {archive.sha256}", ours)


def download_file(archive: Archive, dest: Path) -> Path:
    """``archive`` at ``dest``: downloaded if absent (into a temporary file renamed at the end, so an
    interrupted download leaves nothing), verified either way."""
    dest = Path(dest)
    ours = not dest.exists()
    if ours:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with network_timeout():
                download_url_to_file(archive.url, str(dest), progress=show_progress())
        # URLError is an OSError; a cut chunked transfer an HTTPException; a bad hash a RuntimeError
        except (OSError, RuntimeError, ValueError, http.client.HTTPException) as e:
            dest.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in LOCAL_WRITE_ERRNOS:  # the disk, not the network
                raise UserError(f"cannot write {dest} ({e.strerror}); free some space in {dest.parent} or make it "
                                f"writable (the archive is {_size_text(archive)})") from None
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{archive.url}: download failed ({reason}); download it by hand and save it as "
                            f"{dest}") from None
        # the user's umask, as for any file they write: older torch releases download through a
        # NamedTemporaryFile, whose 0600 survives the rename
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(dest, 0o666 & ~umask)
    verify(dest, archive, ours)
    return dest


def _size_text(archive: Archive) -> str:
    return f"{archive.size / 1e9:.1f} GB" if archive.size else "of unknown size"


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
            with open(archive, "rb") as f:
                compressed = f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))
            # a plain tar cut at a member boundary reads as a shorter archive: its end-of-archive
            # blocks (two of 512 zero bytes) are missing (a compressed one fails in its decoder)
            if not compressed and archive.stat().st_size < tf.offset + 1024:
                raise tarfile.ReadError("no end-of-archive blocks after the last member: the file is cut short")
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


def extract(archive: Path, into: Path, ours: bool = True) -> None:
    """Unpack a .tar/.tar.gz/.zip into ``into``, refusing members that would land outside it. It
    unpacks into a temporary folder of its own first; an archive that does not unpack is deleted
    (renamed aside where it is not ``ours``: :func:`_corrupt`)."""
    into = Path(into).resolve()
    into.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{archive.name}.unpacking.", dir=into))
    try:
        _unpack(archive, work)
        _merge(work, into)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _corrupt(archive, f"not a complete archive ({type(e).__name__}: {e})", ours) from None
    except OSError as e:
        if e.errno in LOCAL_WRITE_ERRNOS:  # a member's write names no file: say where it unpacks
            raise UserError(f"cannot unpack {archive.name} into {into} ({e.strerror}); free some space there (the "
                            "unpacked data takes about the archive's size again) or make it writable") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def download_and_extract(archive: Archive, root: Path) -> None:
    """Download ``archive`` into ``root`` (verified; kept for reuse) and unpack it there."""
    root = Path(root)
    dest = root / archive.name
    ours = not dest.exists()
    extract(download_file(archive, dest), root, ours)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """An exclusive lock on the file ``path`` (created; kept, as removing a lock file races), held
    while the block runs; -> whether it is held (no lock where the system has no ``fcntl``, or
    the file system none)."""
    if fcntl is None:
        yield False
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (Lustre without flock, SMB): go on unlocked
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download_once(root: Path, name: str, present: Callable[[], bool], fetch: Callable[[], None]) -> None:
    """``fetch()`` unless ``present()``, one process at a time per ``root`` and ``name``: a second
    process (another torchrun rank, a second run on the folder) waits for the first, then finds the
    data there. Unpacking work folders left by a killed process are removed first."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock") as locked:
        if present():
            return
        for stale in root.glob(f".{name}.unpacking*") if locked else ():  # unlocked: maybe another's, in use
            shutil.rmtree(stale, ignore_errors=True)
        fetch()
