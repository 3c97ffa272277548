"""One source of truth for training options: the option models (stpm.options.sections, pydantic).
`stpm train`'s flags, POST /train's form model (and its OpenAPI), `stpm.train`'s keywords and the job
runner's configs are generated from them."""

from __future__ import annotations

import inspect
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import stpm
from stpm.cli import build_parser
from stpm.options import SECTIONS, TrainingOptions, build, check, from_args, from_params, option_named, to_params
from stpm.options import form_model, options_of, training_options, values_of
from stpm.options.sections import META

RUN_ARGUMENTS = {"data", "name", "models_dir", "activate", "export", "progress"}  # stpm.train's own


def other_value(o):
    """A valid value of option `o` that is not its default."""
    if o.many:
        return ("layer1", "layer2")
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    if o.kind is bool:
        return not o.default
    if o.kind is str:
        return "cpu" if o.default == "auto" else "w.pth"
    lo = o.ge if o.ge is not None else (o.gt if o.gt is not None else 0)
    if o.default is None:
        candidates = [o.kind(lo) + 1]
    elif o.kind is int:
        candidates = [o.default + 1, o.default - 1, o.default + 2]
    else:
        candidates = [o.default / 2, o.default + 0.5, (o.default + lo) / 2]
    for v in candidates:
        try:
            if check(o, v) == v and v != o.default and build({o.name: v}):  # valid alone and in its section
                return v
        except ValueError:
            continue
    raise AssertionError(f"no other value for {o.name}")


def test_every_option_field_is_an_option_or_marked_internal():
    names = {(o.section, o.field) for o in training_options()}
    for sec, cls in SECTIONS.items():
        for f, info in cls.model_fields.items():
            meta = (info.json_schema_extra or {}).get(META)
            assert meta is not None and info.description, f"{sec}.{f} needs option(...) or internal(...)"
            assert ((sec, f) in names) == meta["user"]
    assert len({o.name for o in training_options()}) == len(training_options())


def test_cli_flags_are_the_options_with_their_defaults_choices_and_bounds(capsys):
    parser = build_parser("train")
    defaults = parser.parse_args(["train", "data", "--name", "n"])
    assert from_args(defaults) == TrainingOptions()  # no default is re-typed anywhere
    argv = ["train", "data", "--name", "n"]
    expected = {}
    for o in training_options():
        v = other_value(o)
        expected[o.name] = v
        if o.kind is bool:
            argv.append(o.flag if v else "--no-" + o.flag[2:])
        else:
            argv += [o.flag, ",".join(v) if o.many else str(v)]
    got = from_args(parser.parse_args(argv))
    assert got == build(expected) and values_of(got) == {**values_of(TrainingOptions()), **expected}
    for bad in (["--lr", "-1"], ["--combine", "max"], ["--epochs", "1.5"], ["--overlap", "nan"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "data", "--name", "n", *bad])
        err = capsys.readouterr().err
        assert bad[0] in err and bad[1] in err, err
    assert "--tile-size" in parser._subparsers._group_actions[0].choices["train"].format_help()


def test_post_train_offers_every_option_but_the_servers_own(tmp_path):
    from app.main import create_app
    from app.routes.train import API_OPTIONS
    from app.settings import Settings

    assert {o.name for o in training_options() if not o.api} == {"weights", "device", "workers"}
    assert API_OPTIONS == tuple(o for o in training_options() if o.api)
    app = create_app(Settings(_env_file=None, models_dir=tmp_path / "m", data_dir=tmp_path / "d"))
    spec = app.openapi()
    ref = spec["paths"]["/train"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    props = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
    assert set(props) == {"files", "name", "activate"} | {o.name for o in API_OPTIONS}
    for o in API_OPTIONS:
        p = props[o.name]
        schema = next((a for a in p.get("anyOf", [p]) if a.get("type") != "null"))
        assert p["description"].startswith(o.help)
        assert p.get("default") == (",".join(o.default) if o.many else o.default)
        if o.choices:
            assert schema["enum"] == list(o.choices)
        for key, bound in (("minimum", o.ge), ("exclusiveMinimum", o.gt), ("maximum", o.le),
                           ("exclusiveMaximum", o.lt)):
            assert schema.get(key) == bound, (o.name, key)


def test_post_train_values_reach_the_job_runner_as_configs(tmp_path):
    """Every API option with a non-default value -> the stored job parameters -> the configs the training
    process builds (app.jobs.run_job: stpm.config.from_params). The queue is held: nothing trains."""
    from test_jobs_helpers import png_bytes

    from app.main import create_app
    from app.routes.train import API_OPTIONS
    from app.settings import Settings

    s = Settings(_env_file=None, models_dir=tmp_path / "models", data_dir=tmp_path / "data", reload_interval_s=0,
                 warmup=False, train_min_images=3)
    app = create_app(s)
    values = {o.name: other_value(o) for o in API_OPTIONS}
    values["epochs"] = 3  # within the server's train_max_epochs
    form = {k: ",".join(v) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in values.items()}
    with TestClient(app) as c:
        app.state.job_runner.concurrency = 0
        files = [("files", (f"{i}.png", png_bytes(i), "image/png")) for i in range(4)]
        r = c.post("/train", data={"name": "all", **form}, files=files)
        assert r.status_code == 202, r.text
        params = r.json()["params"]
        assert "device" not in params["train"]  # the server's setting
        assert from_params(params) == build(values)
        r = c.post("/train", data={"name": "all", "layers": "layer1,layer2", "image_score": "topk_mean",
                                   "topk": "2.5"}, files=files)
        assert r.status_code == 422 and "topk" in r.json()["detail"], r.text
        r = c.post("/train", data={"name": "all", "combine": "max"}, files=files)
        assert r.status_code == 422 and "combine" in r.text
        r = c.post("/train", data={"name": "all", "epoch": "5", "bogus_option": "1"}, files=files)  # typos refused
        assert r.status_code == 422 and "'epoch'" in r.json()["detail"] and "bogus_option" in r.json()["detail"]
        r = c.post("/train", data={"name": "all", "layers": "bogus,../../etc"}, files=files)  # checked at the edge
        assert r.status_code == 422 and "no feature layer" in r.json()["detail"], r.text


def test_stpm_train_keywords_are_the_options_with_their_defaults():
    params = inspect.signature(stpm.train).parameters
    keywords = {k: p.default for k, p in params.items() if k not in RUN_ARGUMENTS}
    assert list(keywords) == [o.name for o in training_options()], (
        "stpm.train's keywords must be exactly the training options (stpm/api.py)")
    for o in training_options():
        assert keywords[o.name] == o.default, o.name
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for k, p in params.items() if k != "data")


def test_unknown_names_and_bad_values_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown training option.*colour"):
        build({"colour": "red"})
    with pytest.raises(ValueError, match=r"epochs=0: must be >= 1"):
        build({"epochs": 0})
    with pytest.raises(ValueError, match="backbone='vgg': choose one of resnet18"):
        build({"backbone": "vgg"})
    with pytest.raises(ValueError, match="topk"):
        build({"image_score": "topk_mean", "topk": 2.5})
    with pytest.raises(TypeError):
        stpm.train("data", name="x", colour="red")  # explicit keywords: no catch-all


def test_the_patchcore_fields_appear_in_the_cli_the_api_and_the_job_runner():
    """The PatchCore options, declared once in ModelOptions (a Literal `method`, `sigma: float | None`,
    bounded numbers), are offered by the CLI, POST /train's form and OpenAPI, and read back by the job
    runner, with None reachable everywhere it is allowed."""
    method, sigma = option_named("method"), option_named("sigma")
    assert method.choices == ("stpm", "patchcore") and method.section == "model"
    assert sigma.kind is float and sigma.optional and sigma.default is None
    # the CLI
    parser = build_parser("train")
    base = ["train", "d", "--name", "n"]
    m = from_args(parser.parse_args(base)).model
    assert (m.method, m.sigma, m.image_score, m.coreset_ratio, m.bank_size) == ("patchcore", None, "auto", 0.01, 16384)
    m = from_args(parser.parse_args(
        base + ["--method", "stpm", "--sigma", "2.5", "--coreset-ratio", "0.25", "--bank-size", "1000",
                "--neighbourhood", "5"])).model
    assert (m.method, m.sigma, m.coreset_ratio, m.bank_size, m.neighbourhood) == ("stpm", 2.5, 0.25, 1000, 5)
    assert from_args(parser.parse_args(base + ["--sigma", "none"])).model.sigma is None
    for bad in (["--method", "nearest"], ["--sigma", "-1"], ["--sigma", "wide"], ["--coreset-ratio", "0"],
                ["--bank-size", "0.5"], ["--neighbourhood", "11"]):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)
    # the API form and its OpenAPI, through the same generator POST /train uses
    from typing import Annotated

    from fastapi import Form

    api_options = tuple(o for o in training_options() if o.api)
    Form_ = form_model("F", {}, api_options)
    seen = {}

    async def endpoint(form):
        seen.clear()
        seen.update(options_of(form, api_options))
        return {}

    endpoint.__annotations__["form"] = Annotated[Form_, Form()]  # a local model: not resolvable from a string

    api = FastAPI()
    api.post("/t")(endpoint)
    with TestClient(api) as c:
        r = c.post("/t", data={"method": "stpm", "sigma": "2.5", "bank_size": "1000", "neighbourhood": "5"})
        assert r.status_code == 200, r.text
        m = build(seen).model
        assert (m.method, m.sigma, m.bank_size, m.coreset_ratio, m.neighbourhood) == ("stpm", 2.5, 1000, 0.01, 5)
        assert c.post("/t", data={"sigma": ""}).status_code == 200 and build(seen).model.sigma is None
        for bad in ({"method": "nearest"}, {"sigma": "-1"}, {"sigma": "nan"}, {"coreset_ratio": "0"},
                    {"bank_size": "1.5"}, {"neighbourhood": "three"}, {"image_score": "median"}, {"bogus": "1"}):
            r = c.post("/t", data=bad)
            assert r.status_code == 422 and next(iter(bad)) in r.text, (bad, r.text)
        schema = c.get("/openapi.json").json()["components"]["schemas"]
    props = next(s["properties"] for s in schema.values() if "method" in s.get("properties", {}))
    assert props["method"]["enum"] == ["stpm", "patchcore"]
    assert set(props["image_score"]["enum"]) == {"max", "topk_mean", "auto"}
    assert {a.get("type") for a in props["sigma"]["anyOf"]} == {"number", "null"}
    assert next(a for a in props["sigma"]["anyOf"] if a.get("type") == "number")["minimum"] == 0
    assert props["coreset_ratio"]["exclusiveMinimum"] == 0 and props["coreset_ratio"]["maximum"] == 1
    # the job runner's side: stored parameters -> configs
    cfg = build({"method": "stpm", "sigma": 2.5})
    assert from_params(to_params(cfg)) == cfg and from_params(to_params(build({}))).model.sigma is None


def test_stpm_train_stays_the_function_after_the_training_modules_are_imported():
    """No module is named like the public function any more (the STPM training loop is
    stpm.methods.stpm.trainer): importing the training code leaves `stpm.train` the function."""
    import stpm.training.pipeline  # noqa: F401
    from stpm.api import train
    from stpm.methods.stpm.trainer import fit

    assert stpm.train is train and callable(fit)
    assert "stpm.train" not in sys.modules
