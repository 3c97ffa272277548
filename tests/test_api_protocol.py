"""HTTP-level refusals: content types, malformed and truncated multipart bodies, a non-numeric
Content-Length, stalled uploads and shutdown, and an OpenAPI document that says what the server answers."""

from __future__ import annotations

import signal
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_api_helpers import make_store, png, raw_request, split_response, start_uvicorn, stop, synthetic_rgb

from app.main import create_app
from app.settings import Settings

BOUNDARY = "b0undary"


def settings(models_dir, **kw) -> Settings:
    return Settings(_env_file=None, models_dir=models_dir, reload_interval_s=0, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("protocol"), versions=1)


@pytest.fixture(scope="module")
def client(store, tmp_path_factory):
    s = settings(store, data_dir=tmp_path_factory.mktemp("protocol-data"), warmup=False)
    with TestClient(create_app(s)) as c:
        yield c


def part(name: str, data: bytes, filename: str | None = "a.png") -> bytes:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\nContent-Type: image/png\r\n\r\n".encode() + data + b"\r\n"


def multipart(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


MP = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.mark.parametrize("path", ["/score", "/score/overlay", "/train"])
@pytest.mark.parametrize("ctype,body", [
    ("application/json", b'{"files": ["x"]}'),
    ("application/x-www-form-urlencoded", b"files=x&name=demo"),
    ("text/plain", b"hello"),
    (None, b"raw bytes"),
])
def test_a_body_that_is_not_multipart_is_415_naming_its_type(client, path, ctype, body):
    """Issue 14 #8: a wrong content type was reported as a missing field."""
    headers = {"content-type": ctype} if ctype else {}
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported_media_type"
    assert "multipart/form-data" in r.json()["detail"]
    assert (ctype or "no Content-Type") in r.json()["detail"]


@pytest.mark.parametrize("ctype,body,needle", [
    ("multipart/form-data", multipart(part("files", b"x")), "no boundary"),
    (f"multipart/form-data; boundary={'x' * 80}", b"--x--", "invalid multipart boundary"),
    (f"multipart/form-data; boundary={BOUNDARY}", b"--other\r\nContent-Disposition: form-data\r\n\r\nx\r\n--other--",
     "malformed multipart body"),
    (f"multipart/form-data; boundary={BOUNDARY}",
     f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(), '"name"'),
    (f"multipart/form-data; boundary={BOUNDARY}",
     multipart(part("files", png(synthetic_rgb(1))), part("files", png(synthetic_rgb(2))[:200]), close=False),
     "truncated"),
])
def test_malformed_multipart_bodies_get_the_parser_s_reason(client, ctype, body, needle):
    """Issue 14 #8: malformed multipart errors said only "Invalid multipart data"; a body cut off before
    its closing boundary silently lost its last file."""
    r = client.post("/score", content=body, headers={"content-type": ctype})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_multipart" and needle in r.json()["detail"], r.json()


def test_a_well_formed_body_without_files_names_the_field(client):
    r = client.post("/score", content=multipart(part("file", png(synthetic_rgb(1)))), headers=MP)
    assert r.status_code == 422 and "missing multipart field 'files'" in r.json()["detail"]
    assert client.post("/score", content=multipart(part("files", png(synthetic_rgb(1)))), headers=MP).status_code == 200


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    data = tmp_path_factory.mktemp("protocol-server")
    proc, url = start_uvicorn(store, {"STPM_BODY_TIMEOUT_S": "1.5", "STPM_DATA_DIR": str(data)})
    yield url, proc
    stop(proc)


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", "12 34"])
def test_a_non_numeric_content_length_gets_the_json_error_shape(server, length):
    """Issue 14 #8: uvicorn's parser answered a Content-Length of `abc` with a plain-text 400."""
    url, _ = server
    host = url.removeprefix("http://")
    raw = raw_request(url, f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n"
                           f"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x--\r\n".encode())
    status, headers, body = split_response(raw)
    assert status == 400 and headers["content-type"] == "application/json", raw[:300]
    import json

    err = json.loads(body)
    assert err["error"] == "bad_request" and "malformed HTTP request" in err["detail"], err
    assert httpx.get(url + "/healthz").status_code == 200


def test_a_stalled_upload_gets_408_and_the_connection_is_closed(server):
    """Issue 14 #8: a client that stops sending its body held the request (and a graceful shutdown) open."""
    url, _ = server
    host = url.removeprefix("http://")
    head = (f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()
    t0 = time.monotonic()
    raw = raw_request(url, head + part("files", b"\x89PNG\r\n")[:60], read_timeout=20)
    waited = time.monotonic() - t0
    status, headers, body = split_response(raw)
    assert status == 408, raw[:300]
    assert b"body_timeout" in body and b"setting body_timeout_s" in body
    assert headers.get("connection") == "close"
    assert waited < 15


def test_sigterm_does_not_wait_for_a_stalled_upload(store, tmp_path):
    proc, url = start_uvicorn(store, {"STPM_BODY_TIMEOUT_S": "2", "STPM_DATA_DIR": str(tmp_path / "data")})
    host, port = url.removeprefix("http://").split(":")
    try:
        s = socket.create_connection((host, int(port)))
        s.sendall((f"POST /score HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 100000\r\n"
                   f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode() + b"--" + BOUNDARY.encode())
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(25)
        assert time.monotonic() - t0 < 15
        s.close()
    finally:
        stop(proc)


def test_openapi_says_what_the_server_answers(client):
    """Issue 14 #8: 422 bodies did not match the advertised schema, `name` had no pattern, empty `files`
    arrays were allowed by the spec but refused."""
    import jsonschema

    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/ErrorResponse", "components": spec["components"]})
    answers = (client.get("/train", params={"offset": "-1"}), client.post("/score", files=[("y", b"1")]),
               client.get("/models/bad%20name"), client.post("/score", content=b"{}", headers={"content-type": "application/json"}))
    assert [r.status_code for r in answers] == [422, 422, 400, 415]
    for r in answers:
        validator.validate(r.json())
    assert answers[0].json()["errors"][0]["loc"] == ["query", "offset"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")):
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse") or (path, code) == ("/readyz", "503"), (method, path, code)
            if "requestBody" in op:
                assert {"400", "408", "413", "415", "422"} <= set(op["responses"]), (method, path)
    name = next(p for p in spec["paths"]["/models/{name}"]["get"]["parameters"] if p["name"] == "name")
    assert name["schema"]["pattern"].startswith("^")
    for body in ("Body_score_score_post", "TrainForm", "Body_score_overlay_score_overlay_post"):
        assert spec["components"]["schemas"][body]["properties"]["files"]["minItems"] == 1
