"""The project's exception hierarchy.

Every error a user can cause is an ApplianceError subclass carrying one clear sentence;
the CLI edge catches ApplianceError once, prints it and exits non-zero. Anything else
reaching the edge is a bug and keeps its traceback.
"""


class ApplianceError(Exception):
    """Base class: the message is a complete sentence meant for the operator."""

    exit_code = 1


class ConfigError(ApplianceError):
    """A configuration file is missing, unreadable or invalid.

    Exit status 2, like a usage error: nothing was changed and the admin must edit the file.
    """

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


class UsageError(ApplianceError):
    """The command line asks for something that does not exist (an unknown service, say)."""

    exit_code = 2


class ResourceError(ApplianceError):
    """A resource could not be brought to its desired state."""


class ServiceError(ApplianceError):
    """supervisord or one of its programs did not do what was asked."""


class LockError(ApplianceError):
    """Another reconfigure holds the lock for longer than we are willing to wait."""


class AuthError(ApplianceError):
    """An auth-service administration request cannot be carried out."""
