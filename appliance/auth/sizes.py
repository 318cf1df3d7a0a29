"""Byte sizes as an admin writes them (`20GiB`, `500 MB`) and as the appliance prints them.

Quotas are typed on the command line and read back in refusals ("team/app uses 21.3 GiB
of its 20 GiB quota"), so parsing and printing live together and round-trip: what
`format_size` prints, `parse_size` reads back to the same figure (at the printed
precision).
"""

from __future__ import annotations

import re

from appliance.errors import AuthError

UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_BINARY = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


class SizeError(AuthError):
    """A size the admin typed that is not one."""


def parse_size(text: str) -> int:
    """Bytes of `20GiB`, `1.5 TB`, `500MiB`, `1024` (bytes); units are case-insensitive."""
    match = _SIZE.fullmatch(text or "")
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in UNITS and unit != "":
        raise SizeError(
            f"{text!r} is not a size; write a number and a unit, like 20GiB, 500MB or "
            f"1.5TiB (units: KiB, MiB, GiB, TiB, KB, MB, GB, TB)."
        )
    size = int(float(match.group(1)) * UNITS.get(unit, 1))
    if size <= 0:
        raise SizeError(f"{text!r} is no size at all; a quota is at least 1 byte.")
    return size


def format_size(size: int) -> str:
    """`21.3 GiB`, `20 GiB`, `512 B`: binary units, one decimal unless it is zero."""
    for unit, factor in _BINARY:
        if size >= factor:
            value = round(size / factor, 1)
            return f"{value:g} {unit}" if value != int(value) else f"{int(value)} {unit}"
    return f"{size} B"
