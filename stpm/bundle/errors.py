"""What the model store raises: a bad reference or a missing / malformed bundle, named in the message.

Messages name models as name/version, never the store's path: they reach API clients."""

from __future__ import annotations


class BundleError(ValueError):
    """A bad model reference or a missing / malformed bundle; the message says which."""


class ModelNotFoundError(BundleError):
    pass


class NoActiveVersionError(ModelNotFoundError):
    """The name has versions but none is activated."""


class MalformedBundleError(BundleError):
    """A bundle whose manifest (or another record) cannot be read or parsed: the store's content is at fault,
    not the reference."""


class VersionInUseError(BundleError):
    """A delete refused because the version is active or serving requests (checked under the name's lock)."""


class StoreNotWritableError(BundleError):
    """The model store cannot be written (a read-only mount, missing permissions): nothing was changed."""


__all__ = ["BundleError", "MalformedBundleError", "ModelNotFoundError", "NoActiveVersionError",
           "StoreNotWritableError", "VersionInUseError"]
