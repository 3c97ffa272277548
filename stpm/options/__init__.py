"""The training options, declared once as pydantic models (stpm.options.sections) and the public option
table generated from them (stpm.options.table): `stpm train`'s flags (stpm.options.cli), the POST /train
form model, `stpm.train`'s keywords and the job runner's parameters. Torch-free."""

from stpm.options.cli import add_arguments, from_args
from stpm.options.sections import *  # noqa: F401,F403
from stpm.options.sections import __all__ as _sections
from stpm.options.table import *  # noqa: F401,F403
from stpm.options.table import __all__ as _table

__all__ = [*_sections, *_table, "add_arguments", "from_args"]
