"""The hostile review, made permanent: a corpus of bad inputs, generated at test time, sent to a real
`python -m app.serve` (uvicorn) process at /score, /score/overlay and /train.

Every case asserts the status, the JSON error shape `{"error": code, "detail": message}` with the
expected code, a message naming the problem, that the server still answers /healthz, and that neither
the model store nor the job store changed (files, sizes, mtimes; the job list). Limits are set small
(see SERVER_ENV) so that bombs and floods stay cheap to build.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_api_helpers import make_store, raw_request, split_response, start_uvicorn, stop

BOUNDARY = "c0rpus"
SERVER_ENV = {
    "STPM_MAX_FILES": "4",
    "STPM_MAX_UPLOAD_BYTES": str(2 << 20),
    "STPM_MAX_REQUEST_BYTES": str(8 << 20),
    "STPM_MAX_PIXELS": str(4_000_000),
    "STPM_MAX_REQUEST_PIXELS": str(8_000_000),
    "STPM_BODY_TIMEOUT_S": "1.5",
    "STPM_TRAIN_MIN_IMAGES": "3",
    "STPM_TRAIN_MAX_IMAGES": "20",
    "STPM_TRAIN_MAX_ARCHIVE_BYTES": str(4 << 20),
    "STPM_TRAIN_MAX_EPOCHS": "50",
}


# ----------------------------------------------------------------------------- generators


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(seed: int = 0, w: int = 48, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 120)], axis=2) + rng.integers(-9, 9, (h, w, 3))
    return save(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "PNG")


def solid(w: int, h: int) -> bytes:
    """Many pixels in few bytes."""
    return save(Image.new("RGB", (w, h), (80, 90, 100)), "PNG", compress_level=9)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header(w: int, h: int, depth: int = 8, ctype: int = 2, idat: bytes = b"\0" * 64) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(idat, 9)) + _chunk(b"IEND", b""))


def png_bomb() -> bytes:
    """A 1-bit 60000 x 60000 PNG: a few hundred bytes that decode to 3.6 G pixels."""
    w = h = 60000
    return png_header(w, h, 1, 0, b"\0" * ((w + 7) // 8 + 1) * 16)


def patched(data: bytes, offset: int, packed: bytes) -> bytes:
    b = bytearray(data)
    b[offset:offset + len(packed)] = packed
    return bytes(b)


def gif_bomb() -> bytes:
    return patched(save(Image.new("RGB", (16, 16)), "GIF"), 6, struct.pack("<HH", 65535, 65535))


def bmp_bomb() -> bytes:
    return patched(save(Image.new("RGB", (16, 16)), "BMP"), 18, struct.pack("<ii", 100000, 100000))


def jpeg_bomb() -> bytes:
    data = save(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG")
    i = data.find(b"\xff\xc0")
    return patched(data, i + 5, struct.pack(">HH", 65000, 65000))


def bad_crc_png() -> bytes:
    good = photo(1)
    return good[:29] + b"\0\0\0\0" + good[33:]


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_lying_sizes() -> bytes:
    """A member whose headers claim 10 bytes but whose data expands to 3 MiB (over the per-image cap):
    zipfile stops at the declared size, and the CRC names the lie."""
    blob = bytearray(zip_of({"a.png": b"\0" * (3 << 20)} | {f"{i}.png": photo(i) for i in range(3)}))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # local header and central directory entry of a.png
        i = blob.find(sig)
        off = 22 if sig == b"PK\x03\x04" else 24
        blob[i + off:i + off + 4] = struct.pack("<I", 10)
    return bytes(blob)


def tar_of(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def lying_tar(declared: int) -> bytes:
    info = tarfile.TarInfo("huge.png")
    info.size = declared
    return info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 4096


def good_images(n: int, seed0: int = 0) -> list[tuple[str, bytes]]:
    return [(f"g{seed0 + i}.png", photo(seed0 + i)) for i in range(n)]


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None
    params: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent as is over a socket (for what httpx will not send)


def files(*named: tuple[str, bytes], field_name: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field_name, (n, b, "application/octet-stream")) for n, b in named]


def train_form(**extra: str) -> dict[str, str]:
    return {"name": "corpus", "method": "stpm", "backbone": "resnet18", "image_size": "64", "pretrained": "false", "epochs": "1",
            **extra}


def score(*named: tuple[str, bytes], **params: str) -> Req:
    return Req("POST", "/score", files=files(*named), params=params or None)


def overlay(*named: tuple[str, bytes], **params: str) -> Req:
    return Req("POST", "/score/overlay", files=files(*named), params=params or None)


def train(*named: tuple[str, bytes], **form: str) -> Req:
    return Req("POST", "/train", files=files(*named), data=train_form(**form))


def multipart_body(parts: list[tuple[str, str | None, bytes]], close: bool = True) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


MP = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def raw_post(path: str, head_extra: str, body: bytes) -> Req:
    return Req("POST", path, raw=(f"POST {path} HTTP/1.1\r\nHost: t\r\n{head_extra}\r\n").encode() + body)


@dataclass(frozen=True)
class Case:
    status: int
    error: str
    needle: str  # a substring of `detail` that names the problem
    make: Callable[[], Req]


CASES: dict[str, Case] = {
    # ---- /score: files that are not images, broken images, bombs, odd modes
    "score/text-named-png": Case(422, "invalid_image", "not an image", lambda: score(("notes.png", b"hello, not a png"))),
    "score/empty-file": Case(422, "invalid_image", "empty file", lambda: score(("empty.png", b""))),
    "score/truncated-png": Case(422, "invalid_image", "truncated.png", lambda: score(("truncated.png", photo(2)[:300]))),
    "score/header-only-png": Case(422, "invalid_image", "head.png", lambda: score(("head.png", photo(2)[:33]))),
    "score/bad-crc-png": Case(422, "invalid_image", "crc.png", lambda: score(("crc.png", bad_crc_png()))),
    "score/png-bomb": Case(422, "invalid_image", "decompression bomb", lambda: score(("bomb.png", png_bomb()))),
    "score/gif-bomb": Case(422, "invalid_image", "decompression bomb", lambda: score(("bomb.gif", gif_bomb()))),
    "score/bmp-bomb": Case(422, "invalid_image", "decompression bomb", lambda: score(("bomb.bmp", bmp_bomb()))),
    "score/jpeg-bomb": Case(422, "invalid_image", "decompression bomb", lambda: score(("bomb.jpg", jpeg_bomb()))),
    "score/over-per-image-pixels": Case(422, "invalid_image", "exceeds the limit of 4000000",
                                        lambda: score(("big.png", solid(2100, 2000)))),
    "score/png-impossible-mode": Case(422, "invalid_image", "mode.png",
                                      lambda: score(("mode.png", png_header(8, 8, depth=1, ctype=2)))),
    "score/png-bit-depth-3": Case(422, "invalid_image", "depth.png", lambda: score(("depth.png", png_header(8, 8, 3, 0)))),
    "score/png-zero-width": Case(422, "invalid_image", "zero.png", lambda: score(("zero.png", png_header(0, 8, 8, 0)))),
    "score/svg": Case(422, "invalid_image", "not an image", lambda: score(("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"))),
    "score/one-good-one-bad": Case(422, "invalid_image", "bad.png",
                                   lambda: score(("good.png", photo(3)), ("bad.png", b"\x89PNG\r\n\x1a\n rest"))),
    # ---- /score: sizes and counts
    "score/too-many-files": Case(413, "too_many_files", "at most 4", lambda: score(*good_images(5))),
    "score/file-too-large": Case(413, "file_too_large", "at most 2097152",
                                 lambda: score(("noise.png", save(Image.fromarray(np.random.default_rng(0).integers(
                                     0, 255, (900, 900, 3), dtype=np.uint8)), "PNG")))),
    "score/request-over-pixel-budget": Case(413, "too_many_pixels", "max_request_pixels",
                                            lambda: score(*[(f"{i}.png", solid(1800, 1800)) for i in range(3)])),
    "score/heatmaps-over-pixel-budget": Case(413, "too_many_pixels", "heatmap",
                                             lambda: score(("a.png", solid(1900, 1900)), ("b.png", solid(1000, 1000)),
                                                           heatmap="both")),
    "score/content-length-over-limit": Case(413, "payload_too_large", "max_request_bytes",
                                            lambda: raw_post("/score", f"Content-Length: {9 << 20}\r\n"
                                                             f"Content-Type: {MP['content-type']}\r\n", b"")),
    # ---- /score: malformed HTTP and multipart
    "score/content-length-not-a-number": Case(400, "bad_request", "malformed HTTP request",
                                              lambda: raw_post("/score", f"Content-Length: abc\r\nContent-Type: "
                                                               f"{MP['content-type']}\r\n", b"--x--")),
    "score/stalled-body": Case(408, "body_timeout", "stalled",
                               lambda: raw_post("/score", f"Content-Length: 50000\r\nContent-Type: {MP['content-type']}\r\n",
                                                multipart_body([("files", "a.png", b"\x89PNG")], close=False))),
    "score/json-body": Case(415, "unsupported_media_type", "application/json",
                            lambda: Req("POST", "/score", content=b'{"files": []}', headers={"content-type": "application/json"})),
    "score/no-content-type": Case(415, "unsupported_media_type", "no Content-Type",
                                  lambda: Req("POST", "/score", content=photo(1))),
    "score/no-boundary": Case(400, "invalid_multipart", "no boundary",
                              lambda: Req("POST", "/score", content=multipart_body([("files", "a.png", photo(1))]),
                                          headers={"content-type": "multipart/form-data"})),
    "score/wrong-boundary": Case(400, "invalid_multipart", "malformed multipart body",
                                 lambda: Req("POST", "/score", content=b"--other\r\n\r\nx\r\n--other--\r\n", headers=MP)),
    "score/truncated-multipart": Case(400, "invalid_multipart", "truncated",
                                      lambda: Req("POST", "/score", headers=MP, content=multipart_body(
                                          [("files", "a.png", photo(1)), ("files", "b.png", photo(2)[:100])], close=False))),
    "score/part-without-name": Case(400, "invalid_multipart", '"name"',
                                    lambda: Req("POST", "/score", headers=MP, content=(
                                        f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n").encode())),
    "score/wrong-field-name": Case(422, "validation_error", "'files'",
                                   lambda: Req("POST", "/score", files=files(("a.png", photo(1)), field_name="file"))),
    # ---- /score: parameters
    "score/model-path-traversal": Case(400, "invalid_model_name", "invalid model reference",
                                       lambda: score(("a.png", photo(1)), model="../../etc/passwd")),
    "score/model-unknown": Case(404, "model_not_found", "'nosuch'", lambda: score(("a.png", photo(1)), model="nosuch")),
    "score/model-version-unknown": Case(404, "model_not_found", "demo/v99", lambda: score(("a.png", photo(1)), model="demo/v99")),
    "score/model-too-long": Case(422, "validation_error", "model", lambda: score(("a.png", photo(1)), model="m" * 300)),
    "score/heatmap-unknown": Case(422, "validation_error", "heatmap", lambda: score(("a.png", photo(1)), heatmap="rainbow")),
    "score/heatmap-size-unknown": Case(422, "validation_error", "heatmap_size",
                                       lambda: score(("a.png", photo(1)), heatmap_size="99999")),
    # ---- /score/overlay
    "overlay/two-files": Case(422, "validation_error", "files", lambda: overlay(("a.png", photo(1)), ("b.png", photo(2)))),
    "overlay/kind-unknown": Case(422, "validation_error", "kind", lambda: overlay(("a.png", photo(1)), kind="x-ray")),
    "overlay/png-bomb": Case(422, "invalid_image", "decompression bomb", lambda: overlay(("bomb.png", png_bomb()))),
    "overlay/text": Case(422, "invalid_image", "not an image", lambda: overlay(("t.png", b"plain text"))),
    "overlay/over-pixel-budget": Case(413, "too_many_pixels", "max_request_pixels",
                                      lambda: overlay(("big.png", solid(2000, 2001)), kind="map")),
    "overlay/xml-body": Case(415, "unsupported_media_type", "application/xml",
                             lambda: Req("POST", "/score/overlay", content=b"<a/>", headers={"content-type": "application/xml"})),
    # ---- /train: parameters
    "train/no-name": Case(422, "validation_error", "name",
                          lambda: Req("POST", "/train", files=files(*good_images(3)), data={"epochs": "1"})),
    "train/name-traversal": Case(422, "invalid_name", "invalid model name", lambda: train(*good_images(3), name="../etc")),
    "train/name-newline": Case(422, "invalid_name", "invalid model name", lambda: train(*good_images(3), name="abc\n")),
    "train/backbone-unknown": Case(422, "validation_error", "backbone", lambda: train(*good_images(3), backbone="vgg")),
    "train/epochs-zero": Case(422, "validation_error", "epochs", lambda: train(*good_images(3), epochs="0")),
    "train/epochs-2**64": Case(422, "validation_error", "epochs", lambda: train(*good_images(3), epochs=str(2**64))),
    "train/epochs-over-server-limit": Case(422, "invalid_parameter", "train_max_epochs",
                                           lambda: train(*good_images(3), epochs="51")),
    "train/lr-nan": Case(422, "validation_error", "lr", lambda: train(*good_images(3), lr="nan")),
    "train/lr-infinite": Case(422, "validation_error", "lr", lambda: train(*good_images(3), lr="1e999")),
    "train/image-size-absurd": Case(422, "validation_error", "image_size", lambda: train(*good_images(3), image_size="100000")),
    "train/batch-size-negative": Case(422, "validation_error", "batch_size", lambda: train(*good_images(3), batch_size="-4")),
    "train/seed-huge": Case(422, "validation_error", "seed", lambda: train(*good_images(3), seed=str(10**40))),
    "train/val-fraction-one": Case(422, "validation_error", "val_fraction", lambda: train(*good_images(3), val_fraction="1")),
    "train/val-fraction-leaves-nothing": Case(422, "invalid_parameter", "leaves no training image",
                                              lambda: train(*good_images(3), val_fraction="0.9")),
    "train/offset-2**64": Case(422, "validation_error", "offset",
                               lambda: Req("GET", "/train", params={"offset": str(2**64)})),
    # ---- /train: images and archives
    "train/too-few-images": Case(422, "too_few_images", "at least 3", lambda: train(*good_images(2))),
    "train/undecodable-image": Case(422, "invalid_upload", "broken.png",
                                    lambda: train(*good_images(3), ("broken.png", photo(9)[:120]))),
    "train/too-many-images": Case(413, "too_many_images", "at most 20", lambda: train(*good_images(21))),
    "train/zip-bomb": Case(413, "archive_too_large", "train_max_archive_bytes",
                           lambda: train(("bomb.zip", zip_of({f"{i}.png": b"\0" * (1900 << 10) for i in range(3)})))),
    "train/zip-lying-sizes": Case(422, "invalid_upload", "Bad CRC-32", lambda: train(("lies.zip", zip_lying_sizes()))),
    "train/zip-too-many-entries": Case(413, "too_many_images", "entries",
                                       lambda: train(("dirs.zip", zip_of({f"d{i}/": b"" for i in range(200)})))),
    "train/zip-nested": Case(422, "invalid_upload", "inner.zip",
                             lambda: train(("outer.zip", zip_of({"inner.zip": zip_of(dict(good_images(3)))})))),
    "train/zip-truncated": Case(422, "invalid_upload", "not a readable",
                                lambda: train(("cut.zip", zip_of(dict(good_images(3)))[:-40]))),
    "train/tar-bomb-oversized-members": Case(413, "archive_too_large", "train_max_archive_bytes",
                                             lambda: train(("bomb.tar.bz2", tar_of([(f"{i}.png", b"\0" * (3 << 20))
                                                                                     for i in range(3)], "w:bz2")))),
    "train/tar-bomb-lying-header": Case(413, "archive_too_large", "17179869184 bytes",
                                        lambda: train(("bomb.tar", lying_tar(16 << 30)))),
    "train/tar-symlink": Case(422, "invalid_upload", "not a regular file",
                              lambda: train(("links.tgz", tar_of([*good_images(3), special("evil.png", tarfile.SYMTYPE,
                                                                                           "/etc/passwd")])))),
    "train/tar-device": Case(422, "invalid_upload", "not a regular file",
                             lambda: train(("dev.tgz", tar_of([*good_images(3), special("null.png", tarfile.CHRTYPE)])))),
    "train/tar-truncated-gzip": Case(422, "invalid_upload", "tar archive",
                                     lambda: train(("cut.tar.gz", tar_of(good_images(3))[:200]))),
    "train/tar-too-many-entries": Case(413, "too_many_images", "entries",
                                       lambda: train(("dirs.tgz", tar_of([special(f"d{i}", tarfile.DIRTYPE)
                                                                          for i in range(200)])))),
    # ---- /train: HTTP and multipart
    "train/json-body": Case(415, "unsupported_media_type", "application/json",
                            lambda: Req("POST", "/train", content=b'{"name": "x"}', headers={"content-type": "application/json"})),
    "train/truncated-multipart": Case(400, "invalid_multipart", "truncated",
                                      lambda: Req("POST", "/train", headers=MP, content=multipart_body(
                                          [("name", None, b"corpus"), ("files", "a.png", photo(1))], close=False))),
    # ---- issue 24's review: unknown options, layers that are paths, a geometry of unbounded work
    "train/unknown-fields": Case(422, "validation_error", "unknown field 'bogus_option'",
                                 lambda: train(*good_images(3), epoch="5", bogus_option="1")),
    "train/layers-traversal": Case(422, "invalid_parameter", "no feature layer bogus",
                                   lambda: train(*good_images(3), layers="bogus,../../etc")),
    "train/tiles-times-size-over-bound": Case(422, "invalid_parameter", "max_tiles",
                                              lambda: train(*good_images(3), scale="4", max_tiles="4096", image_size="64")),
    # ---- /ui: asset names that are not files (a NUL byte gave a 500 and a traceback)
    "ui/null-byte": Case(404, "not_found", "no file /ui/", lambda: Req("GET", "/ui/%00")),
    "ui/not-utf8": Case(404, "not_found", "no file /ui/", lambda: Req("GET", "/ui/%ff%fe")),
    "ui/traversal": Case(404, "not_found", "/ui/", lambda: Req("GET", "/ui/..%2findex.html")),
    "ui/long-name": Case(404, "not_found", "no file /ui/", lambda: Req("GET", "/ui/" + "a" * 5000 + ".js")),
}


# ----------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    models = make_store(root, versions=1)
    data = root / "data"
    proc, url = start_uvicorn(models, {"STPM_DATA_DIR": str(data), **SERVER_ENV})
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/score", files=files(("warm.png", photo(0)))).status_code == 200
    yield url, models, data
    stop(proc)


def snapshot(models: Path, data: Path) -> dict[str, tuple[int, int]]:
    """Every file of the model store and of the uploads folder (size, mtime)."""
    out = {}
    for root in (models, data / "jobs"):
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
    return out


def send(url: str, req: Req) -> tuple[int, dict[str, str], bytes]:
    if req.raw is not None:
        return split_response(raw_request(url, req.raw, read_timeout=20))
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.request(req.method, req.path, files=req.files, data=req.data, params=req.params,
                      content=req.content, headers=req.headers)
        return r.status_code, dict(r.headers), r.content


def test_the_corpus_is_large_enough():
    routes = {name.split("/")[0] for name in CASES}
    assert len(CASES) >= 40 and routes == {"score", "overlay", "train", "ui"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(live, name):
    url, models, data = live
    case = CASES[name]
    req = case.make()
    before = snapshot(models, data)
    jobs_before = httpx.get(url + "/train").json()["jobs"]
    t0 = time.monotonic()
    status, headers, body = send(url, req)
    assert status == case.status, (status, body[:400])
    assert headers.get("content-type", "").startswith("application/json"), headers
    err = json.loads(body)
    assert set(err) >= {"error", "detail"} and isinstance(err["detail"], str), err
    assert err["error"] == case.error, err
    assert case.needle in err["detail"], err["detail"]
    assert time.monotonic() - t0 < 30
    # the server is fine and nothing stored changed
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(url + "/train").json()["jobs"] == jobs_before == []
    assert snapshot(models, data) == before
