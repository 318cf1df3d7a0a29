"""The project's exception hierarchy.

Every error a user can cause is an ApplianceError subclass carrying one clear sentence;
the CLI edge catches ApplianceError once, prints it and exits non-zero. Anything else
reaching the edge is a bug and keeps its traceback.
"""


class ApplianceError(Exception):
    """Base class: the message is a complete sentence meant for the operator."""


class ConfigError(ApplianceError):
    """A configuration file is missing, unreadable or invalid."""


class AuthError(ApplianceError):
    """An auth-service administration request cannot be carried out."""
