"""Training uploads: validate every image, then store them durably, all or nothing.

Each uploaded file is an image or a zip / tar (optionally gz, bz2, xz) of images. Archive members are
never extracted by path: their bytes are read (with caps) and written under a fresh, sanitised name,
so `../`, absolute paths, links and devices cannot escape the job folder; junk such as `__MACOSX/`,
dot files and `Thumbs.db` is skipped. Caps: `max_upload_bytes` per image, `train_max_archive_bytes`
uncompressed per request, `train_max_images` images, and entries per archive (zip bombs, tar bombs and
endless archives stop early). Every byte a tar stream decompresses counts against the archive cap:
headers, skipped and oversized members included; a member whose declared size would cross the cap is
refused before any of it is decompressed. A zip's entry count is read from its end record before its
directory is parsed; xz streams get a decompressor memory limit.

Storage: into `<jobs>/.incoming-<id>/`, every file fsynced, then the folder is renamed to `<jobs>/<id>/`
(and the parent fsynced) before the job row is written: a crash leaves either nothing or an
`.incoming-*` folder that start-up removes, never a half-stored job.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import json
import lzma
import os
import re
import shutil
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from stpm.bundle import fingerprint, fsync_dir
from stpm.imaging.decode import ImageDecodeError, decode_image

IMAGES = "images"
INCOMING = ".incoming-"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
JUNK = {"thumbs.db", "desktop.ini"}
XZ_MEMLIMIT = 256 * 1024 * 1024  # decompressor memory of an xz stream (a huge dictionary is a memory bomb)


def max_entries(lim: Limits) -> int:
    """Entries (files, folders, junk) an archive may hold: room for every image, a folder and a
    __MACOSX twin each."""
    return 3 * lim.max_images + 100


class UploadError(Exception):
    """A refused upload: HTTP status, error code, message, and the bad files [{file, reason}]."""

    def __init__(self, status: int, error: str, detail: str, files: list[dict[str, str]] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.files = status, error, detail, files or []


@dataclass
class StoredUpload:
    job_dir: Path
    images: list[Path]
    fingerprint: str  # the same digest stpm.data.fingerprint gives (recorded in the bundle manifest)
    originals: list[str]


@dataclass(frozen=True)
class Limits:
    min_images: int
    max_images: int
    max_image_bytes: int
    max_archive_bytes: int
    max_pixels: int


def _safe_name(name: str) -> str:
    base = re.split(r"[\\/]", name)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    return base or "image"


def _is_junk(member: str) -> bool:
    parts = [p for p in re.split(r"[\\/]", member) if p]
    return not parts or "__MACOSX" in parts or parts[-1].startswith(".") or parts[-1].lower() in JUNK


def _read_capped(f: IO[bytes], cap: int) -> bytes | None:
    data = f.read(cap + 1)
    return None if len(data) > cap else data


class _Budget:
    """Uncompressed bytes read from archives so far, against the cap."""

    def __init__(self, cap: int):
        self.cap, self.used = cap, 0

    def refuse(self, what: str) -> UploadError:
        return UploadError(
            413, "archive_too_large",
            f"{what}: archives expand to more than {self.cap} bytes (setting train_max_archive_bytes)",
        )

    def take(self, n: int, what: str) -> None:
        self.used += n
        if self.used > self.cap:
            raise self.refuse(what)

    def would_exceed(self, n: int) -> bool:
        return self.used + n > self.cap


class _Counted(io.RawIOBase):
    """A decompressed stream whose every byte read is charged to the budget (so a tar bomb stops at
    the cap, whatever tarfile reads: members, skipped members, headers, padding)."""

    def __init__(self, raw: IO[bytes], budget: _Budget, what: str):
        super().__init__()
        self.raw, self.budget, self.what = raw, budget, what

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.budget.take(n, self.what)
        return n


def _decompressed(f: IO[bytes]) -> IO[bytes]:
    """The tar stream inside a plain, gzip, bzip2 or xz file (by magic bytes)."""
    head = f.read(6)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(f, mode="rb")
    if head == b"\xfd7zXZ\x00":
        return _XZReader(f)
    return f


class _XZReader(io.RawIOBase):
    """xz streams (concatenated ones too) with a decompressor memory limit (lzma.LZMAFile has none)."""

    def __init__(self, f: IO[bytes]):
        super().__init__()
        self.f = f
        self.d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while True:
            if self.d.eof:
                rest = self.d.unused_data
                if not rest:
                    rest = self.f.read(1 << 16)
                    if not rest:
                        return 0
                self.d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
            else:
                rest = b"" if not self.d.needs_input else self.f.read(1 << 16)
                if self.d.needs_input and not rest:
                    raise EOFError("the xz stream ends before its end marker")
            data = self.d.decompress(rest, max_length=len(b))
            if data:
                b[:len(data)] = data
                return len(data)


def _zip_entry_count(f: IO[bytes]) -> int | None:
    """Entries a zip declares in its end record (zip64 included), read before zipfile parses the
    central directory (which costs memory per entry); None if there is no end record."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - (22 + 65535)))
    tail = f.read()
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        return None
    total = struct.unpack("<H", tail[i + 10:i + 12])[0]
    j = i - 20
    if total == 0xFFFF and j >= 0 and tail[j:j + 4] == b"PK\x06\x07":
        f.seek(struct.unpack("<Q", tail[j + 8:j + 16])[0])
        rec = f.read(56)
        if rec[:4] == b"PK\x06\x06" and len(rec) == 56:
            total = struct.unpack("<Q", rec[32:40])[0]
    return total


def _zip_members(name: str, f: IO[bytes], lim: Limits, budget: _Budget) -> Iterator[tuple[str, bytes | str]]:
    declared = _zip_entry_count(f)
    if declared is not None and declared > max_entries(lim):
        raise UploadError(413, "too_many_images", f"{name}: {declared} entries; at most {max_entries(lim)} per "
                          f"archive ({lim.max_images} images per job, setting train_max_images)")
    f.seek(0)
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        yield name, f"not a readable zip archive ({e})"
        return
    files = [i for i in infos if not i.is_dir() and not _is_junk(i.filename)]
    if len(files) > lim.max_images:
        raise UploadError(413, "too_many_images", f"{name}: {len(files)} files; at most {lim.max_images} images "
                          "per job (setting train_max_images)")
    budget.take(sum(i.file_size for i in files), name)  # declared sizes; the reads below are capped too
    for info in files:
        label = f"{name}:{info.filename}"
        if info.file_size > lim.max_image_bytes:
            yield label, f"{info.file_size} bytes; at most {lim.max_image_bytes} per image (setting max_upload_bytes)"
            continue
        try:
            with zf.open(info) as m:
                data = _read_capped(m, lim.max_image_bytes)
        except (zipfile.BadZipFile, RuntimeError, OSError, ValueError, NotImplementedError) as e:
            yield label, f"cannot read from the archive ({e})"
            continue
        if data is None:  # the header lied about the size
            budget.take(lim.max_image_bytes, name)
            yield label, f"expands beyond {lim.max_image_bytes} bytes (setting max_upload_bytes)"
            continue
        budget.take(max(0, len(data) - info.file_size), name)  # more than it declared
        yield label, data


def _tar_members(name: str, f: IO[bytes], lim: Limits, budget: _Budget) -> Iterator[tuple[str, bytes | str]]:
    try:
        stream = io.BufferedReader(_Counted(_decompressed(f), budget, name), buffer_size=1 << 16)
        tf = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 - streamed, closed below
    except UploadError:
        raise
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        yield name, f"not a readable tar archive ({e})"
        return
    count = entries = 0
    try:
        for member in tf:  # streamed: every byte decompressed is charged, and stops at the first cap
            entries += 1
            if entries > max_entries(lim):
                raise UploadError(413, "too_many_images", f"{name}: more than {max_entries(lim)} entries; at most "
                                  f"{lim.max_images} images per job (setting train_max_images)")
            if budget.would_exceed(member.size):  # refused before any of it is decompressed
                raise budget.refuse(f"{name}:{member.name} ({member.size} bytes)")
            if member.isdir() or _is_junk(member.name):
                continue
            label = f"{name}:{member.name}"
            if not member.isreg():  # links, devices, fifos are never followed or created
                yield label, "not a regular file (links and devices are refused)"
                continue
            count += 1
            if count > lim.max_images:
                raise UploadError(413, "too_many_images", f"{name}: more than {lim.max_images} files; at most "
                                  f"{lim.max_images} images per job (setting train_max_images)")
            if member.size > lim.max_image_bytes:
                yield label, f"{member.size} bytes; at most {lim.max_image_bytes} per image (setting max_upload_bytes)"
                continue
            m = tf.extractfile(member)
            data = _read_capped(m, lim.max_image_bytes) if m is not None else None
            yield label, (data if data is not None else "cannot read from the archive")
    except UploadError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        yield name, f"corrupt tar archive ({type(e).__name__}: {e})"
    finally:
        tf.close()


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _items(uploads: list[tuple[str, IO[bytes]]], lim: Limits) -> Iterator[tuple[str, bytes | str]]:
    """(display name, bytes) for every candidate image, or (name, reason) for an unusable entry."""
    budget = _Budget(lim.max_archive_bytes)
    for name, f in uploads:
        f.seek(0)
        if zipfile.is_zipfile(f):
            f.seek(0)
            yield from _zip_members(name, f, lim, budget)
        elif _is_tar(name):
            f.seek(0)
            yield from _tar_members(name, f, lim, budget)
        elif name.lower().endswith(".zip"):
            yield name, "not a readable zip archive (no end-of-archive record: truncated or not a zip)"
        else:
            f.seek(0)
            data = _read_capped(f, lim.max_image_bytes)
            if data is None:
                yield name, f"more than {lim.max_image_bytes} bytes per image (setting max_upload_bytes)"
            else:
                yield name, data


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def store_upload(uploads: list[tuple[str, IO[bytes]]], jobs_root: Path, job_id: str, lim: Limits) -> StoredUpload:
    """Validate and durably store the uploads as `<jobs_root>/<job_id>/images/`. Raises UploadError."""
    if not uploads:
        raise UploadError(422, "no_images", "no files uploaded: send good images in the multipart field `files` "
                          "(repeatable) or one zip/tar of them")
    jobs_root.mkdir(parents=True, exist_ok=True)
    staging = jobs_root / f"{INCOMING}{job_id}"
    final = jobs_root / job_id
    (staging / IMAGES).mkdir(parents=True)
    try:
        stored = _write_images(uploads, staging / IMAGES, lim)
        _write_durably(staging / "files.json", json.dumps(
            {"images": [{"stored": p.name, "uploaded": o} for p, o in stored]}, indent=1).encode())
        fsync_dir(staging / IMAGES)
        fsync_dir(staging)
        os.rename(staging, final)
        fsync_dir(jobs_root)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UploadError(507, "insufficient_storage",
                              f"disk full while storing the upload ({e.strerror}); nothing was stored") from None
        raise
    images = [final / IMAGES / p.name for p, _ in stored]
    return StoredUpload(final, images, fingerprint(images), [o for _, o in stored])


def _write_images(uploads: list[tuple[str, IO[bytes]]], img_dir: Path, lim: Limits) -> list[tuple[Path, str]]:
    """Decode every candidate image (one in memory at a time) and write the good ones into `img_dir`;
    -> (stored file, uploaded name) each. Raises UploadError naming every unusable file, or for too
    many / too few images."""
    bad: list[dict[str, str]] = []
    stored: list[tuple[Path, str]] = []
    seen = 0
    for label, data in _items(uploads, lim):
        if isinstance(data, str):
            bad.append({"file": label, "reason": data})
            continue
        seen += 1
        if seen > lim.max_images:
            raise UploadError(413, "too_many_images", f"more than {lim.max_images} images; at most "
                              f"{lim.max_images} per job (setting train_max_images)")
        try:
            decode_image(data, label, lim.max_pixels)  # decoded and dropped: one image in memory at a time
        except ImageDecodeError as e:
            bad.append({"file": label, "reason": e.reason})
            continue
        if bad:
            continue  # the request fails anyway: stop writing, keep validating to name every bad file
        p = img_dir / f"{len(stored):05d}-{_safe_name(label)}"
        _write_durably(p, data)
        stored.append((p, label))
    if bad:
        raise UploadError(
            422, "invalid_upload",
            f"{len(bad)} file(s) cannot be used for training: "
            + "; ".join(f"{b['file']}: {b['reason']}" for b in bad[:20]) + (" ..." if len(bad) > 20 else ""),
            bad,
        )
    if len(stored) < lim.min_images:
        raise UploadError(422, "too_few_images", f"{len(stored)} good image(s) uploaded; a training job needs "
                          f"at least {lim.min_images} (setting train_min_images)")
    return stored


def clean_incoming(jobs_root: Path, known_ids: set[str], min_age_s: float = 0.0) -> list[Path]:
    """Remove half-stored uploads and job folders without a job row older than `min_age_s`
    (another server process may be storing one right now); -> what was removed."""
    removed = []
    if not jobs_root.is_dir():
        return removed
    now = time.time()
    for p in jobs_root.iterdir():
        try:
            young = now - p.stat().st_mtime < min_age_s
        except OSError:
            continue
        if p.is_dir() and not young and (p.name.startswith(INCOMING) or p.name not in known_ids):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
