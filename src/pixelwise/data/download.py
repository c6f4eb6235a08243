"""Downloading and unpacking public datasets (only where the license allows a direct download)."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from torch.hub import download_url_to_file

from pixelwise.errors import UserError


def download_file(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` (skipped when it exists) via torch.hub, with a progress bar."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(dest), progress=True)
    except OSError as e:  # URLError is an OSError
        raise UserError(f"{url}: download failed ({e}); download it by hand into {dest.parent}") from None
    return dest


def extract(archive: Path, into: Path) -> None:
    """Unpack a .tar/.tar.gz/.zip into ``into``, refusing members that would land outside it."""
    into = Path(into).resolve()
    into.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (into / member).resolve().is_relative_to(into):
                    raise UserError(f"{archive}: unsafe path {member!r} in archive; not extracting")
            zf.extractall(into)
    elif ".tar" in name or name.endswith(".tgz"):
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")
    else:
        raise UserError(f"{archive}: unknown archive type; unpack it by hand into {into}")


def download_and_extract(url: str, root: Path, filename: str | None = None) -> None:
    """Download ``url`` into ``root`` and unpack it there; the archive is kept for reuse."""
    root = Path(root)
    archive = download_file(url, root / (filename or url.rsplit("/", 1)[-1]))
    extract(archive, root)
