"""`stpm train`'s option flags, generated from the option table: one flag per option (and its aliases),
booleans as --x / --no-x, choices, bounds and the default in the help; values checked as everywhere."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from stpm.options.sections import TrainingOptions
from stpm.options.table import TrainingOption, build, check, training_options


def _help(o: TrainingOption) -> str:
    extra = []
    if o.default is not None and o.default != () and o.kind is not bool:
        extra.append(f"default {','.join(o.default) if o.many else o.default}")
    if o.bounds_text():
        extra.append(o.bounds_text())
    if o.optional:
        extra.append("none: unset" if o.kind is not str or o.choices else "empty: unset")
    return o.help + (f" ({'; '.join(extra)})" if extra else "")


def _metavar(o: TrainingOption) -> str:
    one = ("{" + ",".join(o.choices) + "}") if o.choices else o.kind.__name__.upper()
    return f"{one},..." if o.many else one


def add_arguments(parser: argparse.ArgumentParser, options: Sequence[TrainingOption] | None = None) -> None:
    """One flag per option; argparse reports a bad value with `check`'s message."""
    group = parser.add_argument_group("training options (stpm.options)")
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

        group.add_argument(o.flag, *o.aliases, dest=o.name, type=parse, default=o.default, metavar=_metavar(o),
                           help=_help(o))


def from_args(args: argparse.Namespace) -> TrainingOptions:
    """The namespace of a parser built with `add_arguments` -> TrainingOptions."""
    return build({o.name: getattr(args, o.name) for o in training_options()})


__all__ = ["add_arguments", "from_args"]
