"""Project paths and repository names, checked against the registry's name grammar.

Distribution's reference grammar: a name is path components joined by "/", each
component `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`, the whole at most 255 characters.
We are stricter in one place: a double hyphen is legal for registry 2.8 but breaks older
Docker clients (the reference guide's "Docker connection error"), so a project path may
not contain one. Rejecting a path at creation beats a push that fails for every user.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from appliance.errors import AuthError

MAX_NAME_LENGTH = 255
CHECK_NAMESPACE = "appliance--check"
"""The namespace of `appliance-ctl check`'s push and pull probe. The registry accepts it,
but no username or project path can hold a double hyphen (below), so no user's
repository is ever in it; the appliance's own views (history, usage) leave it out."""
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*")
_SEPARATOR_NAMES = {"_": "an underscore", ".": "a period", "-": "a hyphen"}


class InvalidPathError(AuthError):
    """A project path or username the registry could not serve."""


def component_problem(component: str) -> str | None:
    """Why one path component is invalid, in words an operator understands; None if valid."""
    if component == "":
        return "it has an empty component (a leading, trailing or doubled '/')"
    if component != component.lower():
        return f"'{component}' contains uppercase letters (only lowercase is allowed)"
    bad = sorted({ch for ch in component if not (ch.isascii() and (ch.isalnum() or ch in "._-"))})
    if bad:
        shown = " ".join(repr(ch) for ch in bad)
        return f"'{component}' contains characters the registry does not allow: {shown}"
    if component[0] in "._-":
        return (
            f"'{component}' starts with {_SEPARATOR_NAMES[component[0]]}"
            " (it must start with a letter or digit)"
        )
    if component[-1] in "._-":
        return (
            f"'{component}' ends with {_SEPARATOR_NAMES[component[-1]]}"
            " (it must end with a letter or digit)"
        )
    if "--" in component:
        return f"'{component}' contains a double hyphen, which older Docker clients reject"
    if not _COMPONENT.fullmatch(component):
        return (
            f"'{component}' has separators the registry does not allow together "
            "(use one '.', one or two '_', or hyphens between letters and digits)"
        )
    return None


def path_problem(path: str, min_components: int = 1) -> str | None:
    """Why `path` is not a valid repository path (None if it is)."""
    if not path:
        return "it is empty"
    if len(path) > MAX_NAME_LENGTH:
        return f"it is {len(path)} characters long (the registry allows at most {MAX_NAME_LENGTH})"
    components = path.split("/")
    for component in components:
        problem = component_problem(component)
        if problem:
            return problem
    if len(components) < min_components:
        return "it needs a namespace and a name, such as 'group/app'"
    return None


def validate_project_path(path: str) -> str:
    """Return `path` if it can be a project path, otherwise raise InvalidPathError."""
    problem = path_problem(path, min_components=2)
    if problem:
        raise InvalidPathError(f"Invalid project path '{path}': {problem}.")
    return path


def validate_username(name: str) -> str:
    """A username is also its personal namespace, so it must be one valid component."""
    if "/" in name:
        raise InvalidPathError(f"Invalid username '{name}': it must not contain '/'.")
    problem = path_problem(name)
    if problem:
        raise InvalidPathError(f"Invalid username '{name}': {problem}.")
    return name


def is_repository_name(name: str) -> bool:
    """What the registry itself accepts (double hyphens allowed): used for scopes."""
    if not name or len(name) > MAX_NAME_LENGTH:
        return False
    return all(_COMPONENT.fullmatch(c) for c in name.split("/"))


def path_prefixes(name: str) -> list[str]:
    """Component-wise prefixes, longest first: 'a/b/c' -> ['a/b/c', 'a/b', 'a']."""
    components = name.split("/")
    return ["/".join(components[:n]) for n in range(len(components), 0, -1)]


def owning_project(repository: str, projects: Iterable[str]) -> str:
    """The project a repository's bytes count against: the longest project path that
    prefixes it component by component (as the token service decides access), else its
    first component (a user's personal namespace, or a namespace no project owns)."""
    paths = set(projects)
    for prefix in path_prefixes(repository):
        if prefix in paths:
            return prefix
    return repository.split("/", 1)[0]


def is_check_probe(repository: str) -> bool:
    """A repository of `appliance-ctl check`'s probe (pushed, pulled and removed by it)."""
    return repository.split("/", 1)[0] == CHECK_NAMESPACE
