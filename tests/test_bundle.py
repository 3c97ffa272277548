"""The model store: references are validated, publishing is atomic, versions are immutable, a name
serves only its activated version, numbers are never reused, and cleanup spares live publishes."""

import json
import os
import subprocess
import sys
import time

import pytest

from stpm.bundle import store
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
    assert bundle.resolve(tmp_path, "m") == tmp_path / "m" / "v1"  # the first version is the activated one


def test_half_written_versions_and_leftovers_are_never_listed_and_get_cleaned(tmp_path):
    bundle.publish(staged(tmp_path), tmp_path, "m")
    (tmp_path / "m" / "v7").mkdir()  # a folder without a manifest is not a version
    leftover = staged(tmp_path)  # as if the process died before the rename (too old to have an owner)
    assert bundle.list_versions(tmp_path, "m") == ["v1"]
    assert bundle.clean_staging(tmp_path, max_age_s=-1) == [leftover] and not leftover.exists()


def test_active_pointer_and_delete(tmp_path):
    for p in "abc":
        bundle.publish(staged(tmp_path, payload=p), tmp_path, "m")
    bundle.set_active(tmp_path, "m", "v2")
    assert bundle.get_active(tmp_path, "m") == "v2" and bundle.resolve(tmp_path, "m").name == "v2"
    bundle.delete_version(tmp_path, "m", "v2")
    assert bundle.list_versions(tmp_path, "m") == ["v1", "v3"]
    assert bundle.get_active(tmp_path, "m") is None  # pointer removed with its version; nothing else takes over
    with pytest.raises(bundle.NoActiveVersionError, match="no activated version"):
        bundle.resolve(tmp_path, "m")
    assert bundle.resolve(tmp_path, "m/v3").name == "v3"  # a pinned version still resolves
    with pytest.raises(bundle.ModelNotFoundError):
        bundle.set_active(tmp_path, "m", "v2")
    assert bundle.publish(staged(tmp_path), tmp_path, "m")[0] == "v4"  # numbers are never reused
    assert bundle.get_active(tmp_path, "m") is None  # not the first version: not activated


def test_first_version_is_activated_later_ones_only_when_asked(tmp_path):
    """Issue 14 #1: an unasked-for publish never changes what `name` serves."""
    assert bundle.publish(staged(tmp_path, payload="a"), tmp_path, "m")[0] == "v1"
    assert bundle.get_active(tmp_path, "m") == "v1"
    assert bundle.publish(staged(tmp_path, payload="b"), tmp_path, "m")[0] == "v2"
    assert bundle.get_active(tmp_path, "m") == "v1" and bundle.resolve(tmp_path, "m").name == "v1"
    bundle.set_active(tmp_path, "m", "v2")
    assert bundle.resolve(tmp_path, "m").name == "v2"
    # a name whose versions were all deleted is new again: its next version is activated
    bundle.delete_version(tmp_path, "m", "v1")
    bundle.delete_version(tmp_path, "m", "v2")
    assert bundle.publish(staged(tmp_path, payload="c"), tmp_path, "m")[0] == "v3"
    assert bundle.get_active(tmp_path, "m") == "v3"


def test_version_numbers_are_never_reused_after_delete(tmp_path):
    """Issue 14 #4: deleting the newest version must not hand its number to the next publish."""
    for p in "ab":
        bundle.publish(staged(tmp_path, payload=p), tmp_path, "m")
    bundle.delete_version(tmp_path, "m", "v2")
    assert bundle.publish(staged(tmp_path, payload="c"), tmp_path, "m")[0] == "v3"
    bundle.delete_version(tmp_path, "m", "v3")
    bundle.delete_version(tmp_path, "m", "v1")
    assert bundle.list_versions(tmp_path, "m") == []
    assert bundle.publish(staged(tmp_path, payload="d"), tmp_path, "m")[0] == "v4"
    assert json.loads((tmp_path / "m" / "v4" / "manifest.json").read_text())["model"]["payload"] == "d"


def test_a_store_from_before_the_activation_rule_keeps_serving_its_newest_version(tmp_path):
    for v in ("v1", "v2"):  # as the old code left it: versions, no ACTIVE, no high-water mark
        d = tmp_path / "m" / v
        d.mkdir(parents=True)
        bundle.write_manifest(d, {"name": "m", "version": v, "model": {}})
    assert bundle.resolve(tmp_path, "m").name == "v2"
    assert bundle.publish(staged(tmp_path), tmp_path, "m")[0] == "v3"
    assert bundle.get_active(tmp_path, "m") == "v2"  # pinned, not moved to the new version


def test_clean_staging_spares_live_publishes_and_removes_dead_ones(tmp_path):
    """Issue 14 #5: a server start must not delete the staging folder of a publish still running."""
    live = staged(tmp_path)  # owned by this (live) process
    sleeper = subprocess.Popen([sys.executable, "-c", "pass"])
    sleeper.wait()
    dead = tmp_path / "m" / f".staging-{sleeper.pid}-{store._host_tag()}-{'0' * 32}"
    dead.mkdir()
    old_style_young = tmp_path / "m" / ".staging-0123456789abcdef0123456789abcdef"
    old_style_old = tmp_path / "m" / ".staging-fedcba9876543210fedcba9876543210"
    old_style_young.mkdir()
    old_style_old.mkdir()
    week_ago = time.time() - 7 * 86400
    os.utime(old_style_old, (week_ago, week_ago))
    removed = bundle.clean_staging(tmp_path)
    assert sorted(removed) == sorted([dead, old_style_old])
    assert live.is_dir() and old_style_young.is_dir()
    assert bundle.publish(live, tmp_path, "m")[0] == "v1"  # the live publish completes


@pytest.mark.parametrize("ref", ["../etc", "m/../../x", "m/v1/extra", "/abs", "m/latest", "m/v0", ".hidden", "",
                                 "a" * 65, "m\\v1", "m/v1 "])
def test_malformed_references_are_refused(tmp_path, ref):
    with pytest.raises(bundle.BundleError):
        bundle.resolve(tmp_path, ref)


def test_unknown_model_messages_name_neither_the_store_nor_other_models(tmp_path):
    bundle.publish(staged(tmp_path, "known"), tmp_path, "known")
    with pytest.raises(bundle.ModelNotFoundError) as e:
        bundle.resolve(tmp_path, "other")
    assert "'other'" in str(e.value) and "known" not in str(e.value) and str(tmp_path) not in str(e.value)
    with pytest.raises(bundle.ModelNotFoundError) as e:
        bundle.resolve(tmp_path, "known/v9")
    assert str(e.value) == "model known/v9 does not exist"


@pytest.mark.parametrize("name", ["abc\n", "a..b", "v1\n"])
def test_names_with_a_trailing_newline_or_dots_are_refused(name):
    with pytest.raises(bundle.BundleError):
        bundle.check_name(name) if not name.startswith("v") else bundle.check_version(name)


def test_digest_ignores_derived_sections():
    m = {"name": "m", "model": {"a": 1}}
    assert bundle.manifest_digest(m) == bundle.manifest_digest({**m, "exports": {"x": 1}, "metrics": {"y": 2}})
    assert bundle.manifest_digest(m) != bundle.manifest_digest({**m, "model": {"a": 2}})
