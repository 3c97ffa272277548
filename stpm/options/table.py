"""The training options, generated from the config dataclasses (stpm.config): their public names,
types, defaults, choices, bounds and help, for `stpm train` (argparse), POST /train (app.routes.train
builds its form from `training_options()`), `stpm.train` and the job runner. Torch-free.

    opts = training_options()                 # one TrainingOption per user-facing config field
    cfg = build({"epochs": 5, "tiling": "squash"})   # -> TrainingOptions; unknown names and bad values raise
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import cache
from typing import Any, Literal

from stpm.options.sections import OPTION, Option, TrainingOptions


@dataclass(frozen=True)
class TrainingOption:
    name: str  # public: `--name-with-dashes`, form field `name`, keyword `name=`
    section: str  # the TrainingOptions field: model, train, calibration, tiling
    field: str  # the dataclass field
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
    """X | None -> (X, True); X -> (X, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported option type {tp}")
        return args[0], True
    return tp, False


def _describe(section: str, cls: type, f: Any, hints: dict[str, Any]) -> TrainingOption | None:
    meta: Option | None = f.metadata.get(OPTION)
    if meta is None:  # offered as it is (name, type, default, choices), without help or bounds until it gets
        meta = Option(help="")  # metadata=option(...): tests/test_options.py asks for that
    if not meta.user:
        return None
    tp, optional = _unwrap(hints[f.name])
    many, choices = False, None
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{cls.__name__}.{f.name}: only tuple[X, ...] options are supported")
        many, tp = True, args[0]
    if typing.get_origin(tp) is Literal:
        choices, tp = tuple(str(a) for a in typing.get_args(tp)), str
    if tp not in (int, float, bool, str):
        raise TypeError(f"{cls.__name__}.{f.name}: unsupported option type {hints[f.name]}")
    return TrainingOption(
        name=meta.name or f.name, section=section, field=f.name, kind=tp, default=f.default, optional=optional,
        many=many, choices=choices, ge=meta.ge, gt=meta.gt, le=meta.le, lt=meta.lt, help=meta.help, api=meta.api,
        aliases=meta.aliases,
    )


@cache
def training_options() -> tuple[TrainingOption, ...]:
    """Every user-facing option, in declaration order (section by section). Public names are unique."""
    out: list[TrainingOption] = []
    for sec in fields(TrainingOptions):
        cls = sec.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        out += [o for f in fields(cls) if (o := _describe(sec.name, cls, f, hints)) is not None]
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


def check(opt: TrainingOption, value: Any) -> Any:
    """A value for `opt` (a Python value, or text from a command line or a form) -> the config value.
    Raises ValueError naming the option, the value and what is allowed."""
    if value is None or (opt.optional and isinstance(value, str) and _means_none(opt, value)):
        if opt.optional:
            return None
        raise ValueError(f"{opt.name}: a value is required")
    if opt.many:
        items = [x.strip() for x in value.split(",")] if isinstance(value, str) else list(value)
        return tuple(_check_one(opt, x) for x in items if x != "")
    return _check_one(opt, value)


def _means_none(opt: TrainingOption, text: str) -> bool:
    """For an optional option: "" (an empty form field), or "none" where that cannot be a real value."""
    t = text.strip()
    if t == "":
        return True
    return t.lower() == "none" and (opt.kind is not str or opt.choices is not None) and not (
        opt.choices and t in opt.choices)


def _check_one(opt: TrainingOption, value: Any) -> Any:
    what = f"{opt.name}={value!r}"
    if opt.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{what}: expected true or false")
    if opt.kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{what}: expected text")
        if opt.choices is not None and value not in opt.choices:
            raise ValueError(f"{what}: choose one of {', '.join(opt.choices)}")
        return value
    try:
        if opt.kind is int:
            if isinstance(value, float) or (isinstance(value, bool)):
                raise ValueError
            v: float = int(value)
        else:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected {'a whole number' if opt.kind is int else 'a number'}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what}: expected a finite number")
    if ((opt.ge is not None and v < opt.ge) or (opt.gt is not None and v <= opt.gt)
            or (opt.le is not None and v > opt.le) or (opt.lt is not None and v >= opt.lt)):
        raise ValueError(f"{what}: must be {opt.bounds_text()}")
    return v


def build(values: Mapping[str, Any], base: TrainingOptions | None = None) -> TrainingOptions:
    """Public option names -> TrainingOptions (`base`, default all defaults, with these values set).
    Unknown names and bad values raise ValueError naming them; so do combinations the model code
    would refuse later (the image-score spec)."""
    by_name = {o.name: o for o in training_options()}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(unknown)} (known: {', '.join(by_name)})")
    cfg = base or TrainingOptions()
    changes: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        o = by_name[name]
        changes.setdefault(o.section, {})[o.field] = check(o, value)
    cfg = replace(cfg, **{sec: replace(getattr(cfg, sec), **ch) for sec, ch in changes.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainingOptions) -> None:
    """Checks across fields (each field's own type and bounds are `check`'s)."""
    from stpm.imaging.scores import ImageScore

    if cfg.model.image_score != "auto":  # auto: stpm.selection chooses after fitting
        ImageScore(cfg.model.image_score, cfg.model.topk)


def values_of(cfg: TrainingOptions) -> dict[str, Any]:
    """TrainingOptions -> {public name: value} (the inverse of `build`)."""
    return {o.name: getattr(getattr(cfg, o.section), o.field) for o in training_options()}


# ------------------------------------------------------------------------------------ argparse

def _help(o: TrainingOption) -> str:
    extra = []
    if o.default is not None and o.default != () and o.kind is not bool:
        extra.append(f"default {','.join(o.default) if o.many else o.default}")
    if o.bounds_text():
        extra.append(o.bounds_text())
    if o.optional:
        extra.append("none: unset" if o.kind is not str or o.choices else "empty: unset")
    return o.help + (f" ({'; '.join(extra)})" if extra else "")


def add_arguments(parser: argparse.ArgumentParser, options: Sequence[TrainingOption] | None = None) -> None:
    """One flag per option: --name (and its aliases); booleans as --x / --no-x; choices, bounds and the
    default in the help. Values are checked by `check` (argparse reports the message)."""
    group = parser.add_argument_group("training options (stpm.config)")
    for o in options if options is not None else training_options():
        if o.kind is bool:
            group.add_argument(o.flag, *o.aliases, dest=o.name, action=argparse.BooleanOptionalAction,
                               default=o.default, help=_help(o) + f" (default {'on' if o.default else 'off'})")
            continue

        def parse(text: str, o: TrainingOption = o) -> Any:
            try:
                return check(o, text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        group.add_argument(o.flag, *o.aliases, dest=o.name, type=parse, default=o.default,
                           metavar=_metavar(o),
                           help=_help(o))


def _metavar(o: TrainingOption) -> str:
    one = ("{" + ",".join(o.choices) + "}") if o.choices else o.kind.__name__.upper()
    return f"{one},..." if o.many else one


def from_args(args: argparse.Namespace) -> TrainingOptions:
    """The namespace of a parser built with `add_arguments` -> TrainingOptions."""
    return build({o.name: getattr(args, o.name) for o in training_options()})


__all__ = ["TrainingOption", "add_arguments", "build", "check", "from_args", "option_named", "training_options",
           "validate", "values_of"]
