"""The training options, declared once: sections (model, train, calibration, tiling) and the public
option table that generates `stpm train`'s flags, the POST /train form and `stpm.train`'s keywords.
Torch-free."""

from stpm.options.sections import *  # noqa: F401,F403
from stpm.options.sections import __all__ as _sections
from stpm.options.table import *  # noqa: F401,F403
from stpm.options.table import __all__ as _table

__all__ = [*_sections, *_table]
