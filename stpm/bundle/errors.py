"""What the model store raises: a bad reference or a missing / malformed bundle, named in the message."""

from __future__ import annotations


class BundleError(ValueError):
    """A bad model reference or a missing / malformed bundle; the message says which."""


class ModelNotFoundError(BundleError):
    pass


class NoActiveVersionError(ModelNotFoundError):
    """The name has versions but none is activated."""


__all__ = ["BundleError", "ModelNotFoundError", "NoActiveVersionError"]
