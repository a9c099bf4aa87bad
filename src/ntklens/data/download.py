"""Checksummed downloads into the user cache, all-or-nothing.

A file is streamed into a hidden temporary file next to its destination while being
hashed, and renamed into place only when the byte count and SHA-256 match. Any failure
(bad checksum, connection cut, interrupt) removes the temporary file, so the cache never
holds a half-written or unverified file.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

from ntklens.errors import DataError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
MIRROR_ENV = "NTKLENS_MIRROR"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ntklens``, or ``~/.cache/ntklens`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ntklens"


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextmanager
def atomic_output(destination: Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``destination``; rename it into place on success.

    If the body raises, the temporary file is removed and ``destination`` is untouched.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed and renamed below
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part", delete=False
    )
    temporary = Path(handle.name)
    try:
        with handle:
            yield handle
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def _stream(response: http.client.HTTPResponse, sink: BinaryIO, url: str) -> tuple[int, str]:
    """Copy ``response`` into ``sink``; return bytes received and their SHA-256."""
    declared = response.headers.get("Content-Length")
    total = int(declared) if declared is not None else None
    digest = hashlib.sha256()
    received = 0
    with Progress(
        *Progress.get_default_columns()[:3],
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task(f"download {url.rsplit('/', 1)[-1]}", total=total)
        while chunk := response.read(CHUNK_BYTES):
            digest.update(chunk)
            sink.write(chunk)
            received += len(chunk)
            progress.update(task, advance=len(chunk))
    if total is not None and received != total:
        raise DataError(
            f"download of {url} was cut off after {received} of {total} bytes; try again"
        )
    return received, digest.hexdigest()


def download_file(url: str, destination: Path, sha256: str) -> Path:
    """Download ``url`` to ``destination`` if its SHA-256 equals ``sha256``.

    Raises :class:`DataError` naming the URL on a checksum mismatch, a cut connection or
    a network error; in every failure case nothing is left at or beside ``destination``.
    """
    destination = Path(destination)
    request = urllib.request.Request(url, headers={"User-Agent": "ntklens"})
    with atomic_output(destination) as sink:
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                _, actual = _stream(response, sink, url)
        except http.client.IncompleteRead as exc:
            raise DataError(
                f"download of {url} was cut off after {len(exc.partial)} bytes; try again"
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise DataError(
                f"download of {url} failed ({exc}); check the network or the mirror"
            ) from None
        if actual != sha256.lower():
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; "
                "the mirror serves a different file, try another mirror"
            )
    return destination


def fetch_verified(urls: list[str], destination: Path, sha256: str) -> Path:
    """Ensure ``destination`` holds the file with ``sha256``, trying ``urls`` in order.

    A file already at ``destination`` with the right checksum is kept; one with a wrong
    checksum is replaced. If every URL fails, the error lists each failure.
    """
    if destination.is_file() and sha256_of(destination) == sha256.lower():
        return destination
    failures = []
    for url in urls:
        try:
            return download_file(url, destination, sha256)
        except DataError as exc:
            failures.append(str(exc))
    raise DataError(" | ".join(failures))


def extract_members(archive: Path, members: dict[str, str], directory: Path) -> None:
    """Extract tar ``members`` (member name -> output file name) into ``directory``.

    Only the named members are read, each written atomically, so a hostile archive
    cannot write outside ``directory``.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member_name, file_name in members.items():
                try:
                    source = tar.extractfile(member_name)
                except KeyError:
                    source = None
                if source is None:
                    raise DataError(
                        f"{archive}: archive has no file {member_name!r}; delete it and fetch "
                        "it again"
                    )
                with source, atomic_output(directory / file_name) as sink:
                    shutil.copyfileobj(source, sink, CHUNK_BYTES)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{archive}: cannot read archive ({exc}); delete it and fetch it again"
        ) from None
