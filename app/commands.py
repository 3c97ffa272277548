"""The service's commands on the `stpm` CLI (`stpm serve`, `stpm worker`) and as `python -m` modules.

app registers them itself: pyproject.toml's entry-point group `stpm.commands` names each module's
`register`, which stpm/cli.py discovers (stpm never imports app). A command module is imported to list
its command, so it imports only what its arguments need at the top; the rest (uvicorn, Celery, the app)
is imported inside its `main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import Settings


@dataclass(frozen=True)
class Command:
    """One sub-command: its name and help, how it adds its arguments, and its `main(args) -> exit code`."""

    name: str
    help: str
    description: str | None
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], int]

    def register(self, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add the command to `stpm`'s sub-commands (the `stpm.commands` entry point calls this)."""
        p = sub.add_parser(self.name, help=self.help, description=self.description,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(p)
        p.set_defaults(func=self.main)
        return p

    def run(self, prog: str, argv: list[str] | None = None) -> int:
        """`python -m MODULE`: the same arguments and main, without the `stpm` CLI."""
        p = argparse.ArgumentParser(prog=prog, description=self.description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(p)
        return self.main(p.parse_args(argv))


def load_settings(command: str, env_file: str | Path | None) -> Settings | None:
    """The service settings (STPM_* variables and the .env file, or `env_file`); None, with the reasons
    printed, when they are invalid."""
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        return Settings(_env_file=env_file) if env_file else Settings()
    except ValidationError as e:
        print(f"stpm {command}: invalid settings:\n{e}", file=sys.stderr)
        return None
