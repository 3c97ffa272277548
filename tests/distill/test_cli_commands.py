"""Every `stpm distill` command end to end on scikit-learn digits (one epoch, tiny models)."""
import json

import pytest

from stpm.distill.cli import METHOD_OPTIONS, METHODS, main

COMMON = ["--data", "digits", "--n-train", "300", "--epochs", "1", "--no-progress", "--device", "cpu"]


def _run(args, out):
    assert main(args + COMMON + ["--out", str(out)]) == 0
    return json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A full teacher with an ESKD snapshot, and two teachers of disjoint class halves, all on split seed 0."""
    d = tmp_path_factory.mktemp("teachers")
    full = _run(["train", "--model", "cnn4", "--snapshot-epochs", "1"], d / "full.pt")
    low = _run(["train", "--model", "mlp32", "--classes", "0-4"], d / "low.pt")
    high = _run(["train", "--model", "cnn4", "--classes", "5,6,7,8,9"], d / "high.pt")
    assert full["snapshots"] == [str(d / "full.epoch1.pt")]
    assert low["classes"] == [0, 1, 2, 3, 4] and 0.0 <= low["test_accuracy_on_its_classes"] <= 1.0
    return d, high


def test_every_method_is_a_cli_choice_with_its_options():
    assert set(METHODS) == set(METHOD_OPTIONS)
    for m in ("sp", "cc", "vid", "rkd", "pkt", "nst", "crd", "reviewkd", "dkd", "fitnets", "at", "fsp"):
        assert m in METHODS


@pytest.mark.parametrize("method", ["kd", "dkd", "sp", "crd", "reviewkd"])
def test_kd_with_a_trained_teacher_records_only_the_settings_it_used(method, teachers, tmp_path):
    d, _ = teachers
    report = _run(["kd", "--teacher", "cnn4", "--teacher-weights", str(d / "full.pt"), "--student", "cnn2",
                   "--method", method], tmp_path / "s.pt")
    assert report["kd"]["method"] == method
    assert ("hard_weight" in report["kd"]) == (method == "kd")
    assert ("ce_weight" in report["kd"]) == (method != "kd")


def test_eskd_snapshot_is_a_teacher_of_the_same_split(teachers, tmp_path):
    d, _ = teachers
    report = _run(["kd", "--teacher", "cnn4", "--teacher-weights", str(d / "full.epoch1.pt"), "--student", "cnn2"],
                  tmp_path / "eskd.pt")
    assert report["split"]["split_seed"] == 0


def test_options_a_method_does_not_read_are_refused(teachers, tmp_path):
    d, _ = teachers
    with pytest.raises(SystemExit, match="--temperature is not used by --method fitnets"):
        _run(["kd", "--teacher", "cnn4", "--teacher-weights", str(d / "full.pt"), "--student", "cnn2",
              "--method", "fitnets", "--temperature", "3"], tmp_path / "x.pt")


def test_takd_dml_multi_disjoint_noisy_student_latent(teachers, tmp_path):
    d, _ = teachers
    r = _run(["takd", "--path", "cnn4,cnn2", "--teacher-weights", str(d / "full.pt")], tmp_path / "takd.pt")
    assert set(r["chain_test_errors"]) == {"cnn4", "cnn2"}
    r = _run(["dml", "--models", "cnn2,mlp32"], tmp_path / "dml.pt")
    assert len(r["peer_test_errors"]) == 2
    full = str(d / "full.pt")
    _run(["multi", "--teachers", "cnn4,cnn4", "--teacher-weights", f"{full},{full}", "--student", "mlp16"],
         tmp_path / "multi.pt")
    r = _run(["disjoint", "--teachers", "mlp32,cnn4", "--teacher-weights", f"{d / 'low.pt'},{d / 'high.pt'}",
              "--student", "mlp32"], tmp_path / "disjoint.pt")
    assert r["teacher_classes"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and r["labels_used"] == 0
    r = _run(["noisy-student", "--teacher", "mlp32", "--student", "mlp32d", "--n-labeled", "100",
              "--iterations", "2"], tmp_path / "ns.pt")
    assert len(r["iteration_test_errors"]) == 2
    r = _run(["latent", "--teachers", "cnn4,cnn4", "--teacher-weights", f"{full},{full}",
              "--teacher-feature-layers", "stage1,stage2", "--student", "mlp16"], tmp_path / "latent.pt")
    assert r["student_layer"] == "body"


def test_teachers_of_some_classes_are_refused_where_all_classes_are_needed(teachers, tmp_path):
    d, high = teachers
    with pytest.raises(SystemExit, match="disjoint"):
        _run(["kd", "--teacher", "cnn4", "--teacher-weights", str(d / "high.pt"), "--student", "cnn2"],
             tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="classes"):
        _run(["disjoint", "--teachers", "cnn4,cnn4", "--teacher-weights", f"{d / 'full.pt'},{d / 'high.pt'}",
              "--student", "mlp32"], tmp_path / "y.pt")


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        _run(["kd", "--teacher", "cnn4", "--teacher-weights", str(tmp_path / "nope.pt"), "--student", "cnn2"],
             tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="--classes"):
        _run(["train", "--model", "mlp16", "--classes", "7-12"], tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="augment"):
        _run(["train", "--model", "mlp16", "--augment", "rotate"], tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="data-dir"):
        main(["train", "--model", "mlp16", "--data", "folder", "--out", str(tmp_path / "x.pt")])
