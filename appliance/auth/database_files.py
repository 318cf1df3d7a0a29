"""The SQLite database's files on disk, checked before anything opens or chowns them.

The database directory belongs to the auth service's account, while appliance-ctl and
reconfigure run as root and chown the database's files back to that account. A file
the service account replaced with a symbolic link (`auth.db-wal -> /etc/shadow`) would
have root hand the link's target over; SQLite itself refuses such a file with a bare
"unable to open database file". So every opener asks here first and gets one sentence
that names the file and the fix. Its own module, importing nothing heavy, so the
reconfigure recipe can use it without loading the service's data layer.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from appliance.errors import AuthError

SUFFIXES = ("", "-wal", "-shm", "-journal")
"""The database file and the files SQLite keeps beside it."""


def check_database_files(db_path: Path) -> None:
    """Raise AuthError when the database or a file beside it is not a plain file."""
    for suffix in SUFFIXES:
        path = Path(f"{db_path}{suffix}")
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as error:
            raise AuthError(
                f"The auth database file {path} cannot be examined ({error.strerror});"
                " check the permissions of its directory."
            ) from error
        if stat.S_ISLNK(mode):
            raise AuthError(
                f"The auth database file {path} is a symbolic link, which the appliance"
                " never creates; remove the link (and find out who made it), then retry."
            )
        if not stat.S_ISREG(mode):
            raise AuthError(
                f"The auth database file {path} is not a regular file; move it away, then retry."
            )


def chown_database_files(db_path: Path, uid: int, gid: int) -> None:
    """Give the database's files to the service account, never following a link."""
    check_database_files(db_path)
    for suffix in SUFFIXES:
        path = Path(f"{db_path}{suffix}")
        try:
            info = os.lstat(path)
            if (info.st_uid, info.st_gid) != (uid, gid):
                os.chown(path, uid, gid, follow_symlinks=False)
        except FileNotFoundError:
            pass
