"""The typed manifest: every earlier format parses (tests/data/manifests, written by the commits named in its
README), the digest is the one readers always computed, and a malformed manifest is one BundleError naming
the bundle and the field (never the store's path, never a KeyError deep in a reader)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stpm import bundle
from stpm.bundle.manifest import Manifest
from stpm.imaging.geometry import Geometry

DATA = Path(__file__).parent / "data" / "manifests"


def _raw(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_format_1_squashes_scores_the_map_maximum_and_is_stpm():
    m = Manifest.parse(_raw("format1-stpm.json"))
    assert m.format_version == 1 and m.tiling is None
    assert m.geometry == Geometry.squash(m.model.image_size) and m.image_score.method == "max"
    assert m.method == "stpm" and m.calibration.threshold > m.calibration.low
    assert m.digest() == bundle.manifest_digest(_raw("format1-stpm.json"))
    assert m.export_files and m.exports.parity["ok"]


def test_format_2_without_a_method_is_stpm_with_its_tiling():
    raw = _raw("format2-stpm-no-method.json")
    m = Manifest.parse(raw)
    assert m.format_version == 2 and m.method == "stpm" and m.geometry == Geometry(**raw["tiling"])
    assert m.digest() == bundle.manifest_digest(raw)


def test_format_2_patchcore_with_its_bf16_record():
    m = Manifest.parse(_raw("format2-patchcore.json"))
    assert m.method == "patchcore" and m.exports.precision("bf16") is not None
    assert m.to_dict() == _raw("format2-patchcore.json")  # the JSON as read, unchanged by the parse


@pytest.mark.parametrize("change,field", [
    (lambda r: [], "not a JSON object"),
    (lambda r: {**r, "model": 5}, "model"),
    (lambda r: {**r, "exports": "oops"}, "exports"),
    (lambda r: {k: v for k, v in r.items() if k != "calibration"}, "calibration"),
    (lambda r: {**r, "calibration": {**r["calibration"], "threshold": "high"}}, "calibration.threshold"),
    (lambda r: {**r, "tiling": {**r["tiling"], "tile": 999}}, "tiling.tile"),
    (lambda r: {**r, "tiling": {**r["tiling"], "overlap": 2}}, "tiling"),
])
def test_a_malformed_manifest_is_one_error_naming_the_bundle_and_the_field(change, field):
    with pytest.raises(bundle.BundleError, match=rf"demo/v1: .*{field}"):
        Manifest.parse(change(_raw("format2-patchcore.json")), "demo/v1")


def test_reading_names_the_bundle_not_the_store_path(tmp_path):
    d = tmp_path / "secret-store" / "demo" / "v1"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(bundle.BundleError) as e:
        Manifest.read(d)
    assert "demo/v1" in str(e.value) and "secret-store" not in str(e.value)
    with pytest.raises(bundle.ModelNotFoundError, match="demo/v2 is not a model bundle"):
        Manifest.read(d.parent / "v2")
