"""The public option table, generated from the option models (stpm.options.sections): one `TrainingOption`
per user-facing field, with its public name, type, default, choices, bounds and help. From it come
`stpm train`'s flags (stpm.options.cli), the POST /train form model (`form_model`), `stpm.train`'s keywords
(stpm.api) and `build`, which turns public names and values into TrainingOptions. Torch-free.

    cfg = build({"epochs": 5, "tiling": "squash"})   # unknown names and bad values raise ValueError naming them
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo

from stpm.methods import registry
from stpm.options.sections import META, SECTIONS, TrainingOptions

_BOUND_KEYS = {"ge": "ge", "gt": "gt", "le": "le", "lt": "lt"}


@dataclass(frozen=True)
class TrainingOption:
    name: str  # public: `--name-with-dashes`, form field `name`, keyword `name=`
    section: str  # the TrainingOptions field: model, train, calibration, tiling
    field: str  # the section's field
    kind: type  # int, float, bool or str (the element type for `many`)
    default: Any
    optional: bool = False  # None is a value (the default means "chosen automatically")
    many: bool = False  # a tuple of `kind` (comma-separated on the command line and in forms)
    choices: tuple[str, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    help: str = ""
    api: bool = True  # offered by POST /train
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def bounds_text(self) -> str:
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """X | None -> (X, True); X -> (X, False); Annotated[X, ...] -> X."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported option type {tp}")
        return _unwrap(args[0])[0], True
    return tp, False


def _bounds(info: FieldInfo) -> dict[str, float]:
    out = {}
    for m in info.metadata:
        for k in _BOUND_KEYS:
            v = getattr(m, k, None)
            if v is not None:
                out[k] = v
    return out


def _describe(section: str, fname: str, info: FieldInfo) -> TrainingOption | None:
    meta = (info.json_schema_extra or {}).get(META, {}) if isinstance(info.json_schema_extra, dict) else {}
    if not meta.get("user", False):
        return None
    tp, optional = _unwrap(info.annotation)
    many, choices = False, None
    if typing.get_origin(tp) is tuple:
        many, tp = True, typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        choices, tp = tuple(str(a) for a in typing.get_args(tp)), str
    if section == "model" and fname == "method":
        choices = registry.names()
    if tp not in (int, float, bool, str):
        raise TypeError(f"{section}.{fname}: unsupported option type {info.annotation}")
    return TrainingOption(name=meta.get("name") or fname, section=section, field=fname, kind=tp,
                          default=info.default, optional=optional, many=many, choices=choices,
                          help=info.description or "", api=meta.get("api", True),
                          aliases=tuple(meta.get("aliases", ())), **_bounds(info))


@cache
def training_options() -> tuple[TrainingOption, ...]:
    """Every user-facing option, in declaration order (section by section). Public names are unique."""
    out = [o for sec, cls in SECTIONS.items() for f, info in cls.model_fields.items()
           if (o := _describe(sec, f, info)) is not None]
    seen: dict[str, TrainingOption] = {}
    for o in out:
        if o.name in seen:
            p = seen[o.name]
            raise TypeError(f"two options are named {o.name!r}: {p.section}.{p.field} and {o.section}.{o.field}; "
                            "give one of them option(name=...)")
        seen[o.name] = o
    return tuple(out)


def option_named(name: str) -> TrainingOption:
    for o in training_options():
        if o.name == name:
            return o
    raise KeyError(name)


# ------------------------------------------------------------------------------------------- values

def _none_text(opt: TrainingOption, value: Any) -> bool:
    """For an optional option: "" (an empty form field), or "none" where that cannot be a real value."""
    if not (opt.optional and isinstance(value, str)):
        return False
    t = value.strip()
    return t == "" or (t.lower() == "none" and (opt.kind is not str or opt.choices is not None)
                       and not (opt.choices and t in opt.choices))


def _message(opt: TrainingOption, value: Any, err: dict[str, Any]) -> str:
    """A pydantic error about one option's value -> "name=value: what is allowed"."""
    what, kind = f"{opt.name}={value!r}", err.get("type", "")
    if kind.startswith(("greater", "less")):
        return f"{what}: must be {opt.bounds_text()}"
    if kind == "literal_error" or (opt.choices and kind == "value_error"):
        return f"{what}: choose one of {', '.join(opt.choices or ())}"
    if kind.startswith("int_"):
        return f"{what}: expected a whole number"
    if kind == "finite_number":
        return f"{what}: expected a finite number"
    if kind.startswith("float_"):
        return f"{what}: expected a number"
    if kind.startswith("bool_"):
        return f"{what}: expected true or false"
    return f"{what}: {err.get('msg', 'invalid')}"


@cache
def _adapter(section: str, field: str) -> TypeAdapter:
    info = SECTIONS[section].model_fields[field]
    tp = typing.Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(tp, config=ConfigDict(allow_inf_nan=False))


def check(opt: TrainingOption, value: Any) -> Any:
    """A value for `opt` (a Python value, or text from a command line or a form) -> the option's value.
    Raises ValueError naming the option, the value and what is allowed."""
    if value is None or _none_text(opt, value):
        if opt.optional:
            return None
        raise ValueError(f"{opt.name}: a value is required")
    if opt.kind is int and isinstance(value, (bool, float)) or opt.kind is float and isinstance(value, bool):
        raise ValueError(f"{opt.name}={value!r}: expected {'a whole number' if opt.kind is int else 'a number'}")
    try:
        return _adapter(opt.section, opt.field).validate_python(value, strict=False)
    except ValidationError as e:
        raise ValueError(_message(opt, value, e.errors()[0])) from None


def build(values: Mapping[str, Any], base: TrainingOptions | None = None) -> TrainingOptions:
    """Public option names -> TrainingOptions (`base`, default all defaults, with these values set).
    Unknown names and bad values raise ValueError naming them; so do combinations a section refuses (the
    image-score spec, an even neighbourhood)."""
    by_name = {o.name: o for o in training_options()}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(unknown)} (known: {', '.join(by_name)})")
    base = base or TrainingOptions()
    changes: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        o = by_name[name]
        changes.setdefault(o.section, {})[o.field] = check(o, value)
    sections = {}
    for sec in SECTIONS:
        current = getattr(base, sec)
        try:
            sections[sec] = type(current).model_validate({**current.model_dump(), **changes.get(sec, {})})
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
    try:
        return TrainingOptions(**sections)
    except ValidationError as e:  # a combination across sections (the work one image may need)
        raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


def values_of(cfg: TrainingOptions) -> dict[str, Any]:
    """TrainingOptions -> {public name: value} (the inverse of `build`)."""
    return {o.name: getattr(getattr(cfg, o.section), o.field) for o in training_options()}


# ------------------------------------------------------------------------------------ the form

def _form_field(o: TrainingOption) -> tuple[Any, Any]:
    """One option as a form field: its type (choices as an enum), default, bounds and help."""
    tp: Any = str if o.many else (Literal[o.choices] if o.choices else o.kind)  # type: ignore[valid-type]
    if o.optional:
        tp = typing.Annotated[tp | None, BeforeValidator(lambda v, o=o: None if _none_text(o, v) else v)]
    bounds = {k: v for k, v in (("ge", o.ge), ("gt", o.gt), ("le", o.le), ("lt", o.lt)) if v is not None}
    help = o.help + (" (comma-separated)" if o.many else "")
    default = ",".join(o.default) if o.many else o.default
    return tp, Field(default, description=help, **bounds)


def form_model(name: str, own: dict[str, tuple[Any, Any]], options: tuple[TrainingOption, ...]) -> type[BaseModel]:
    """A pydantic model of a form: its own fields, then one per option; unknown fields are refused (422)."""
    fields = {**own, **{o.name: _form_field(o) for o in options}}
    return create_model(name, __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


def options_of(form: BaseModel, options: tuple[TrainingOption, ...]) -> dict[str, Any]:
    """The option values a form model holds, by public name (for `build`)."""
    return {o.name: getattr(form, o.name) for o in options}


__all__ = ["TrainingOption", "build", "check", "form_model", "option_named", "options_of", "training_options",
           "values_of"]
