"""Downloads verified by checksum, written atomically, and archives extracted safely.

A file only ever appears under its final name once it is complete and its checksum
matched, so an interrupted or corrupted transfer leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from cifar100.errors import UserError

CHUNK = 1 << 20


class DownloadError(UserError):
    """A transfer that failed, was cut short, or did not match its checksum."""


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256_prefix: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``; verify md5 and/or a sha256 prefix before publishing it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            md5_hash, sha_hash = _stream(url, out, timeout, progress)
        if md5 and md5_hash.hexdigest() != md5:
            raise DownloadError(
                f"{url}: md5 {md5_hash.hexdigest()} does not match the expected {md5}"
            )
        if sha256_prefix and not sha_hash.hexdigest().startswith(sha256_prefix):
            raise DownloadError(
                f"{url}: sha256 {sha_hash.hexdigest()[:16]}... does not start with the "
                f"expected {sha256_prefix}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, out, timeout: float, progress: bool):
    md5_hash, sha_hash = hashlib.md5(), hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=Path(url).name,
                # None: tqdm shows the bar on a terminal only, so logs and pipes stay clean
                disable=None if progress else True,
                file=sys.stderr,
                leave=False,
            ) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    md5_hash.update(chunk)
                    sha_hash.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"{url}: download failed ({reason})") from None
    if total is not None and received != total:
        raise DownloadError(f"{url}: transfer cut short ({received} of {total} bytes)")
    return md5_hash, sha_hash


def extract_tar(archive: str | Path, target: str | Path) -> None:
    """Extract into ``target`` atomically; refuse members that would escape it.

    Extraction happens in a temporary sibling folder whose contents are moved into place
    only when every member was safe and the archive read to the end.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract.", dir=target))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(archive, member)
                _extract_members(tar, staging, members)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise DownloadError(f"{archive}: not a readable tar archive ({error})") from None
        for item in staging.iterdir():
            final = target / item.name
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(item, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_members(tar: tarfile.TarFile, staging: Path, members) -> None:
    # The "data" filter is a second line of defence; Python < 3.10.12 lacks it, and there
    # _check_member alone keeps every member inside the staging folder.
    if hasattr(tarfile, "data_filter"):
        tar.extractall(staging, members=members, filter="data")
    else:
        tar.extractall(staging, members=members)


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or (member.issym() or member.islnk()):
        raise DownloadError(f"{archive}: unsafe archive member '{name}' refused")
    if not (member.isfile() or member.isdir()):
        raise DownloadError(f"{archive}: unsupported archive member '{name}' refused")
