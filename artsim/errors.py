"""Errors that reach the user as one line: exit status 2 for bad config / bad input, 1 for a stage that ran but
failed (:class:`StageFailed`)."""


class ArtsimError(Exception):
    """A user-facing error: bad input, not a bug. The CLI prints it on one line and exits 2."""


class ConfigError(ArtsimError):
    """A config value is wrong; the message starts with the key path (e.g. ``download.image_size: ...``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self):  # picklable, so that a Ray task's ConfigError reaches the driver as itself
        return (type(self), (self.path, self.message))


class IntegrityError(ArtsimError):
    """A stored artifact does not match its recorded checksum (tampered or truncated)."""


class StageFailed(ArtsimError):
    """The stage ran to its end and committed its output, but something in it went wrong that needs a person (e.g.
    internal errors in the download). The CLI prints the message on one line and exits 1."""

    exit_code = 1
