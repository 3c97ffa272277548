"""Model bundles: names of their files, the store (versions, activation, locks, atomic publish), the files
on disk (atomic writes, the manifest's JSON and digest) and the typed manifest (stpm.bundle.manifest).
Torch-free. The store's, the files' and the errors' names are the package's API (`bundle.publish`, ...)."""

from stpm.bundle.errors import *  # noqa: F401,F403
from stpm.bundle.errors import __all__ as _errors
from stpm.bundle.files import *  # noqa: F401,F403
from stpm.bundle.files import __all__ as _files
from stpm.bundle.names import EVALUATIONS, MANIFEST  # noqa: F401
from stpm.bundle.store import *  # noqa: F401,F403
from stpm.bundle.store import __all__ as _store

__all__ = [*_errors, *_files, *_store, "EVALUATIONS", "MANIFEST"]
