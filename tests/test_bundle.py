"""The model store: references are validated, publishing is atomic, versions are immutable."""

import json

import pytest

from stpm import bundle


def staged(models, name="m", payload="x"):
    d = bundle.new_staging_dir(models, name)
    (d / "weights.bin").write_text(payload)
    bundle.write_manifest(d, {"name": name, "version": None, "model": {"payload": payload}})
    return d


def test_publish_numbers_versions_and_staging_is_invisible(tmp_path):
    d = staged(tmp_path)
    assert bundle.list_versions(tmp_path, "m") == [] and bundle.list_models(tmp_path) == []
    assert bundle.publish(d, tmp_path, "m")[0] == "v1"
    assert bundle.publish(staged(tmp_path, payload="y"), tmp_path, "m")[0] == "v2"
    assert bundle.list_versions(tmp_path, "m") == ["v1", "v2"] and not d.exists()
    assert json.loads((tmp_path / "m" / "v2" / "manifest.json").read_text())["version"] == "v2"
    assert bundle.resolve(tmp_path, "m") == tmp_path / "m" / "v2"  # newest without an ACTIVE pointer


def test_half_written_versions_and_leftovers_are_never_listed_and_get_cleaned(tmp_path):
    bundle.publish(staged(tmp_path), tmp_path, "m")
    (tmp_path / "m" / "v7").mkdir()  # a folder without a manifest is not a version
    leftover = staged(tmp_path)  # as if the process died before the rename
    assert bundle.list_versions(tmp_path, "m") == ["v1"]
    assert bundle.clean_staging(tmp_path) == [leftover] and not leftover.exists()


def test_active_pointer_and_delete(tmp_path):
    for p in "abc":
        bundle.publish(staged(tmp_path, payload=p), tmp_path, "m")
    bundle.set_active(tmp_path, "m", "v2")
    assert bundle.get_active(tmp_path, "m") == "v2" and bundle.resolve(tmp_path, "m").name == "v2"
    bundle.delete_version(tmp_path, "m", "v2")
    assert bundle.list_versions(tmp_path, "m") == ["v1", "v3"]
    assert bundle.get_active(tmp_path, "m") == "v3"  # pointer removed with its version
    with pytest.raises(bundle.ModelNotFoundError):
        bundle.set_active(tmp_path, "m", "v2")
    assert bundle.publish(staged(tmp_path), tmp_path, "m")[0] == "v4"  # numbers are never reused


@pytest.mark.parametrize("ref", ["../etc", "m/../../x", "m/v1/extra", "/abs", "m/latest", "m/v0", ".hidden", "",
                                 "a" * 65, "m\\v1", "m/v1 "])
def test_malformed_references_are_refused(tmp_path, ref):
    with pytest.raises(bundle.BundleError):
        bundle.resolve(tmp_path, ref)


def test_unknown_model_lists_known_ones(tmp_path):
    bundle.publish(staged(tmp_path, "known"), tmp_path, "known")
    with pytest.raises(bundle.ModelNotFoundError, match="known"):
        bundle.resolve(tmp_path, "other")


def test_digest_ignores_derived_sections():
    m = {"name": "m", "model": {"a": 1}}
    assert bundle.manifest_digest(m) == bundle.manifest_digest({**m, "exports": {"x": 1}, "metrics": {"y": 2}})
    assert bundle.manifest_digest(m) != bundle.manifest_digest({**m, "model": {"a": 2}})
