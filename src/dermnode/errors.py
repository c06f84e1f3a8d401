"""Exception hierarchy of dermnode.

Every error that crosses a module boundary is a :class:`DermnodeError`, so callers (the SCP handlers, the
workers, the CLI) can turn it into a DICOM status, a dead-letter record or an exit code without catching
unrelated exceptions.
"""

from __future__ import annotations


class DermnodeError(Exception):
    """Base class of all dermnode errors."""


class ConfigError(DermnodeError):
    """The configuration is invalid; the message names the offending key."""


class StorageError(DermnodeError):
    """The spool or the queue database cannot durably store data."""


class InsufficientSpaceError(StorageError):
    """Free disk space is below ``storage.min_free_mb``."""


class DecodeError(DermnodeError):
    """A DICOM dataset or its pixel data cannot be read or decoded."""


class ModelError(DermnodeError):
    """A model file is missing, corrupt or does not match its declared identity."""


class PipelineError(DermnodeError):
    """An analysis stage failed for a reason other than unusable input."""


class OutputError(DermnodeError):
    """A DICOM or FHIR output object cannot be built or validated."""


class DeliveryError(DermnodeError):
    """A result could not be delivered to its destination.

    Parameters
    ----------
    message: str
        Human readable description, safe to log (no PHI, no credentials).
    permanent: bool
        ``True`` when retrying cannot help (e.g. an HTTP 4xx answer or a DICOM refusal status), so the
        delivery goes to the dead-letter table at once instead of being retried.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
