"""The one small exception tree of gradprobe: catch ``GradprobeError`` to catch them all."""


class GradprobeError(Exception):
    """Base class of every error gradprobe raises on purpose."""


class ExportError(GradprobeError):
    """A model (or one of its layers) cannot be turned into a probe graph."""


class BackendUnavailableError(GradprobeError):
    """A runtime backend or optional dependency is missing; the message names the extra to install."""


class InputError(GradprobeError, ValueError):
    """An argument has the wrong type, shape, dtype or value; the message names the expected one."""


class NotFittedError(GradprobeError):
    """A detector or head was used before it was fitted."""


class BundleError(GradprobeError):
    """A bundle directory is missing, incomplete, corrupt, foreign, locked or from another schema."""


class DataError(GradprobeError):
    """A data set is missing or unreadable; the message says how to install it."""
