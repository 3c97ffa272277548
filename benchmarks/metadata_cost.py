"""What reading a scorer graph's ONNX metadata costs at load, per way of reading it (one run, one bundle).

The runtime checks every session's `stpm.manifest_digest` against the manifest. It reads the metadata from
the backend that loaded the graph: ONNX Runtime's model metadata (`get_modelmeta().custom_metadata_map`)
and OpenVINO's `rt_info["framework"]` of the model it has read anyway. Until issue 23 an OpenVINO session
read the file a second time with a hand-written protobuf parser (kept here, only to time it). Each way is
timed against what a session costs to create, on the same file.

    python benchmarks/metadata_cost.py models/bottle/v1 --out benchmarks/results/metadata_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview):
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, v


def protobuf_metadata(path: Path) -> dict[str, str]:
    """The former reader (stpm/runtime/backends.py before issue 23): ModelProto field 14, file read again."""
    out = {}
    for num, wt, v in _fields(memoryview(path.read_bytes())):
        if num == 14 and wt == 2:
            kv = {n: bytes(x).decode() for n, w, x in _fields(v) if w == 2}
            out[kv.get(1, "")] = kv.get(2, "")
    return out


def best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def main() -> int:
    import openvino as ov

    from stpm.runtime.cpu import cpu_name
    from stpm.runtime.sessions import OpenVinoSession, _openvino_metadata, cpu_session

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="a bundle folder with scorer.onnx")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metadata_cost.json"))
    a = ap.parse_args()
    path = Path(a.bundle) / "scorer.onnx"
    ort_s, ov_s = cpu_session(path, threads=1), OpenVinoSession(path, "fp32", threads=1)
    model = ov.Core().read_model(str(path))
    assert ort_s.metadata() == ov_s.metadata() == protobuf_metadata(path)
    res = {
        "command": " ".join(["benchmarks/metadata_cost.py", *sys.argv[1:]]), "cpu": cpu_name(),
        "load_avg_at_start": list(os.getloadavg()), "file_bytes": path.stat().st_size, "repeats": a.repeats,
        "best_ms": {
            "protobuf_reader_rereads_file": best_ms(lambda: protobuf_metadata(path), a.repeats),
            "onnxruntime_modelmeta": best_ms(lambda: ort_s.session.get_modelmeta().custom_metadata_map, a.repeats),
            "openvino_rt_info": best_ms(lambda: _openvino_metadata(model), a.repeats),
            "onnxruntime_session_create": best_ms(lambda: cpu_session(path, threads=1), max(3, a.repeats // 4)),
            "openvino_session_create": best_ms(lambda: OpenVinoSession(path, "fp32", threads=1), max(3, a.repeats // 4)),
        },
        "load_avg_at_end": list(os.getloadavg()),
    }
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
