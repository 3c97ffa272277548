"""The CLI answers bad input with a clear message and exit code 2, never a traceback."""

import json
import shutil
from pathlib import Path

import pytest

from stpm.cli import main


def good_folder(tmp_path, images, n):
    """A folder holding copies of the first n real good images."""
    data = tmp_path / "good"
    data.mkdir()
    for p in images[:n]:
        shutil.copy(p, data / p.name)
    return data


def test_train_on_a_folder_with_bad_files_names_them(tmp_path, bottle_good, capsys):
    data = good_folder(tmp_path, bottle_good, 4)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rc = main(["train", str(data), "--name", "x", "--models-dir", str(tmp_path / "m"), "--no-pretrained",
               "--image-size", "32", "--epochs", "1", "--no-export"])
    err = capsys.readouterr().err
    assert rc == 2 and "broken.png" in err and "--skip-bad" in err
    assert not (tmp_path / "m" / "x").exists() or not any((tmp_path / "m" / "x").glob("v*"))


def test_train_skip_bad_trains_publishes_and_reports(tmp_path, bottle_good, capsys):
    data = good_folder(tmp_path, bottle_good, 5)
    (data / "empty.png").write_bytes(b"")
    rc = main(["train", str(data), "--name", "x", "--models-dir", str(tmp_path / "m"), "--no-pretrained",
               "--image-size", "32", "--epochs", "1", "--batch-size", "2", "--no-export", "--skip-bad",
               "--run-dir", str(tmp_path / "run"), "--activate"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "skipped" in err and "empty.png" in err
    summary = json.loads(out[out.index("{"):])
    assert summary["model"] == "x/v1" and summary["threshold"] > 0
    assert (tmp_path / "m" / "x" / "ACTIVE").read_text().strip() == "v1"
    manifest = json.loads((tmp_path / "m" / "x" / "v1" / "manifest.json").read_text())
    assert manifest["data"]["n_images"] == 5 and manifest["data"]["skipped"][0].endswith("empty.png")
    # a second version without --activate is published but does not take over the name (issue 14 #1)
    rc = main(["train", str(data), "--name", "x", "--models-dir", str(tmp_path / "m"), "--no-pretrained",
               "--image-size", "32", "--epochs", "1", "--batch-size", "2", "--no-export", "--skip-bad",
               "--run-dir", str(tmp_path / "run2")])
    assert rc == 0
    assert (tmp_path / "m" / "x" / "v2" / "manifest.json").is_file()
    assert (tmp_path / "m" / "x" / "ACTIVE").read_text().strip() == "v1"


@pytest.mark.parametrize("args, message", [
    (["eval", "nosuchmodel", "."], "no model named 'nosuchmodel'"),
    (["eval", "../etc/passwd", "."], "invalid model"),
    (["export", "a/b/c"], "invalid model reference"),
    (["export", "/nonexistent/models/x/v1"], "a bundle folder (with manifest.json) or a model folder"),
    (["train", "/nonexistent/folder", "--name", "x"], "does not exist"),
    (["train", ".", "--name", "../evil"], "invalid model name"),
])
def test_bad_references_and_folders_get_clear_errors(tmp_path, capsys, args, message):
    rc = main([*args, "--models-dir", str(tmp_path)])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_train_exports_and_predict_writes_overlays_and_json(tmp_path, bottle, bottle_good, capsys):
    from PIL import Image

    m = str(tmp_path / "m")
    data = good_folder(tmp_path, bottle_good, 4)
    rc = main(["train", str(data), "--name", "p", "--models-dir", m, "--no-pretrained", "--method", "stpm", "--image-size", "32",
               "--epochs", "1", "--batch-size", "2", "--run-dir", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    bundle_dir = tmp_path / "m" / "p" / "v1"
    assert {"scorer.onnx", "teacher.onnx", "student.onnx"} <= {f.name for f in bundle_dir.iterdir()}
    assert json.loads((bundle_dir / "manifest.json").read_text())["exports"]
    capsys.readouterr()
    defect = bottle / "test" / "broken_large" / "000.png"
    rc = main(["predict", "p", str(defect), str(tmp_path / "good" / bottle_good[0].name), "--models-dir", m,
               "--out", str(tmp_path / "pred")])
    assert rc == 0
    report = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert report["model"] == "p/v1" and len(report["results"]) == 2
    for r in report["results"]:
        assert 0.0 <= r["score"] <= 1.0 and r["is_anomaly"] == (r["raw_score"] >= r["threshold"])
        with Image.open(r["overlay"]) as im:
            assert im.size == (512, 512)  # overlays at the input's size
    # both inputs are named 000.png: each keeps its own overlay (one used to overwrite the other)
    assert defect.name == bottle_good[0].name
    overlays = [r["overlay"] for r in report["results"]]
    assert len(set(overlays)) == 2 and {Path(o).name for o in overlays} == {"broken_large__000_overlay.png",
                                                                            "good__000_overlay.png"}
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(
        [Path(o).name for o in overlays] + ["predictions.json"])


def test_a_model_folder_path_scores_with_its_activated_version(tmp_path, bottle_good, capsys):
    m = tmp_path / "m"
    data = good_folder(tmp_path, bottle_good, 4)
    for _ in range(2):  # v1 activated, v2 published beside it
        assert main(["train", str(data), "--name", "p", "--models-dir", str(m), "--no-pretrained", "--method", "stpm",
                     "--image-size", "32", "--epochs", "1", "--batch-size", "2", "--run-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    rc = main(["predict", str(m / "p"), str(data / bottle_good[0].name), "--out", str(tmp_path / "pred")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())["model"] == "p/v1"
    (m / "q").mkdir()  # a folder with no versions is neither a model nor a bundle
    assert main(["predict", str(m / "q"), str(data / bottle_good[0].name)]) == 2
    assert "a model folder with published versions" in capsys.readouterr().err


def test_overlay_names_are_distinct_and_short():
    from stpm.cli import overlay_stems

    def names(*paths: str) -> list[str]:
        got = overlay_stems([Path(p) for p in paths])
        return [got[Path(p).absolute()] for p in paths]

    assert names("a/good/000.png", "a/crack/000.png", "x.png") == ["good__000", "crack__000", "x"]
    assert names("d/000.png", "d/000.jpg") == ["000_png", "000_jpg"]
    assert names("d/000.png", "./d/000.png") == ["000", "000"]  # one file given twice: one name
    got = names("/x/good__000.png", "/x/good/000.png", "/y/000.png")  # a stem that looks like a folder name
    assert len(set(got)) == 3


def test_scoring_only_install_serves_without_torch():
    """`pip install .` has no torch: `stpm serve` must still work, and torch commands say what is missing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from stpm.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "sys.exit(main(['export', 'm']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--models-dir" in r.stdout, r.stderr
    assert r.returncode == 2 and "stpm export: not available in this installation" in r.stderr, r.stderr


def test_stpm_serve_does_not_import_torch(tmp_path):
    """Issue 14 #6: `stpm serve` (the Docker entry point) runs uvicorn without torch in the process
    (checked in sys.modules just as uvicorn would start, not by RSS)."""
    import subprocess
    import sys

    code = (
        "import sys, uvicorn\n"
        "def fake_run(*args, **kwargs):\n"
        "    heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'onnx'))\n"
        "    print('HEAVY', heavy, 'APP', kwargs.get('factory'))\n"
        "uvicorn.run = fake_run\n"
        "from stpm.cli import main\n"
        f"sys.exit(main(['serve', '--models-dir', {str(tmp_path)!r}, '--port', '0']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY [] APP True" in r.stdout, r.stdout


def test_help_lists_every_command_without_importing_them():
    import subprocess
    import sys

    code = ("import sys\nfrom stpm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    for command in ("train", "eval", "export", "predict", "activate", "bench", "serve", "worker", "distill"):
        assert command in r.stdout
    assert "TORCH False" in r.stdout


@pytest.mark.parametrize("command, flag", [("export", "--opset"), ("bench", "--batch-sizes"), ("serve", "--port"),
                                           ("worker", "--concurrency")])
def test_every_module_command_loads_its_arguments(command, flag, capsys):
    """The modules behind the lazily imported commands exist and add their own arguments (a moved module
    would otherwise leave its command saying `not available in this installation`)."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and flag in capsys.readouterr().out


def test_commands_come_from_the_entry_point_group_and_a_broken_one_says_why(tmp_path):
    """`serve` and `worker` are registered by app through the `stpm.commands` entry points (stpm never
    imports app); another distribution's command is listed the same way, and one whose module cannot be
    imported stays listed and answers with the reason, not a traceback or a usage error."""
    import os
    import subprocess
    import sys

    info = tmp_path / "stpm_extra-0.1.dist-info"  # a real (installed-looking) distribution on sys.path
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stpm-extra\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[stpm.commands]\nbroken = no_such_module_for_stpm:register\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(tmp_path)]))}
    code = ("import sys\nfrom stpm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('APP', sorted(m for m in sys.modules if m == 'app' or m.startswith('app.')))\n"
            "sys.exit(main(['broken', 'anything', '--at-all']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert "stpm broken: not available in this installation" in r.stderr and "no_such_module_for_stpm" in r.stderr
    listed = r.stdout[: r.stdout.index("APP")]
    assert all(name in listed for name in ("broken", "serve", "worker"))
    assert "'app.serve'" in r.stdout and "'app.celery_worker'" in r.stdout
    code = ("import sys\nfrom stpm.cli import build_parser\nbuild_parser('activate')\n"
            "print('APP', [m for m in sys.modules if m == 'app' or m.startswith('app.')])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "APP []" in r.stdout, r.stdout + r.stderr  # another command runs: the service is not imported


def test_activate_command(tmp_path, capsys):
    from stpm import bundle

    for payload in "ab":
        d = bundle.new_staging_dir(tmp_path, "m")
        bundle.write_manifest(d, {"name": "m", "version": None, "model": {"payload": payload}})
        bundle.publish(d, tmp_path, "m")
    assert bundle.get_active(tmp_path, "m") == "v1"
    assert main(["activate", "m/v2", "--models-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "m", "active_version": "v2", "previous_version": "v1"}
    assert bundle.get_active(tmp_path, "m") == "v2"
    assert main(["activate", "m", "--models-dir", str(tmp_path)]) == 2
    assert "m/vN" in capsys.readouterr().err
    assert main(["activate", "m/v7", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model m/v7 does not exist" in err and "models in" in err


def test_eval_writes_report_pictures_and_records_metrics_beside_an_unchanged_version(tmp_path, bottle,
                                                                                      bottle_good, capsys):
    """A published version is immutable in fact: `stpm export` adds ONNX files and the manifest's
    `exports` record only (weights and the digest over every other field unchanged), `stpm eval` writes
    eval.json beside the manifest and changes nothing else."""
    from stpm import bundle
    from stpm.bundle import names

    m = str(tmp_path / "m")
    data = good_folder(tmp_path, bottle_good, 5)
    assert main(["train", str(data), "--name", "e", "--models-dir", m, "--no-pretrained", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "2", "--no-export", "--run-dir", str(tmp_path / "run")]) == 0
    version = tmp_path / "m" / "e" / "v1"
    weights = {f.name: bundle.sha256_file(f) for f in version.glob("*.safetensors")}  # teacher + bank (default)
    assert names.TEACHER_WEIGHTS in weights and names.MEMORY_BANK_WEIGHTS in weights
    published = bundle.read_manifest(version)
    assert main(["export", "e", "--models-dir", m]) == 0
    exported = bundle.read_manifest(version)
    assert {k for k in exported if exported[k] != published.get(k)} == {"exports"}
    assert bundle.manifest_digest(exported) == bundle.manifest_digest(published)
    manifest_bytes = (version / names.MANIFEST).read_bytes()
    capsys.readouterr()
    out = tmp_path / "ev"
    assert main(["eval", "e", str(bottle), "--models-dir", m, "--out", str(out)]) == 0
    assert {f.name for f in out.iterdir()} == {
        "report.json", "index.html", "roc.png", "best_highestscored_defects.png",
        "worst_lowestscored_defects.png", "worst_highestscored_good.png"}
    report = json.loads((out / "report.json").read_text())
    assert len(report["per_image"]) == 83
    assert set(report["metrics"]["per_defect"]) == {"broken_large", "broken_small", "contamination"}
    for key in ("image_auroc", "pixel_auroc", "aupro_0.3"):
        assert 0.0 <= report["metrics"]["overall"][key] <= 1.0
    recorded = json.loads((version / names.EVALUATIONS).read_text())["bottle"]
    assert recorded["image_auroc"] == report["metrics"]["overall"]["image_auroc"]
    assert bundle.read_evaluations(version)["bottle"] == recorded
    points = report["decision"]["operating_points"]  # other --target-fpr thresholds from the recorded scores
    assert points and recorded["operating_points"] == points and sum(p["current"] for p in points) == 1
    assert "other operating points" in capsys.readouterr().out
    assert (version / names.MANIFEST).read_bytes() == manifest_bytes  # not rewritten
    assert {f: bundle.sha256_file(version / f) for f in weights} == weights
