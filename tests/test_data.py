import shutil

import pytest

from stpm.training.data import DataError, fingerprint, good_train_dir, list_images, load_images
from stpm.training.data import test_samples as mvtec_test_samples


def test_mvtec_layout_is_read_with_masks(bottle):
    assert good_train_dir(bottle) == bottle / "train" / "good"
    samples = mvtec_test_samples(bottle)
    defects = {s.defect for s in samples}
    assert defects == {"good", "broken_large", "broken_small", "contamination"}
    assert sum(s.label for s in samples) == 63 and len(samples) == 83
    assert all(s.mask is not None and s.mask.is_file() for s in samples if s.label == 1)


def test_bad_files_are_all_named_or_skipped_on_request(tmp_path, bottle_good):
    for p in bottle_good[:3]:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(bottle_good[0].read_bytes()[:5000])
    (tmp_path / "notes.png").write_text("not a picture")
    paths = list_images(tmp_path)
    with pytest.raises(DataError) as e:
        load_images(paths, 32)
    for name in ("zero.png", "truncated.png", "notes.png"):
        assert name in str(e.value)
    assert "--skip-bad" in str(e.value)
    images, kept, skipped = load_images(paths, 32, skip_bad=True)
    assert images.shape == (3, 32, 32, 3) and len(kept) == 3
    assert {p.name for p, _ in skipped} == {"zero.png", "truncated.png", "notes.png"}


def test_plain_folder_and_missing_folder(tmp_path, bottle_good):
    shutil.copy(bottle_good[0], tmp_path / "a.png")
    assert good_train_dir(tmp_path) == tmp_path
    with pytest.raises(DataError, match="does not exist"):
        good_train_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        good_train_dir(tmp_path / "empty")


def test_fingerprint_depends_on_content(tmp_path, bottle_good):
    a = fingerprint(bottle_good[:3])
    assert a == fingerprint(list(reversed(bottle_good[:3])))
    assert a != fingerprint(bottle_good[1:4])
