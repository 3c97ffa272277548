"""Model bundles: names of their files, the store (versions, activation, locks, atomic publish) and the
typed manifest. Torch-free."""

from stpm.bundle.store import *  # noqa: F401,F403  (the store's API is the package's)
from stpm.bundle.store import __all__ as _store_all

__all__ = list(_store_all)
