"""User-facing errors. The CLI prints ``str(err)`` as one line and exits 2; nothing else.

Raise :class:`UserError` for anything the user can fix (bad path, bad config key, corrupt
file), with a message that names the file and says what to do.
"""

import errno
import math
import os
import re
from pathlib import Path
from typing import TypeGuard


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


def listed(values, k: int = 6) -> str:
    """The first ``k`` of ``values`` for a one-line message: ``a, b, c, ...``."""
    values = list(values)
    return ", ".join(map(str, values[:k])) + (", ..." if len(values) > k else "")


def finite(value) -> bool:
    """``math.isfinite(value)``, False (not OverflowError) for an int beyond a float's range: a
    400-digit number in a JSON or YAML file or on the command line is not a usable number either."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def finite_number(value: object) -> TypeGuard[int | float]:
    """``value`` is an int or float (not a bool, which Python counts as one) and finite: what a
    number read from JSON, YAML or a flag must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and finite(value)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def brief(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a one-line message, its middle left out past ``limit`` characters: a
    400-digit number from a flag or a file is named, not printed over a screen."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text):,} characters)"


def shown(text: object) -> str:
    """``text`` for a terminal line, its control characters (C0, DEL, C1) written as visible
    escapes (``\\x1b``, ``\\n``): a file or class name from a dataset or a shared checkpoint then
    cannot run an escape sequence (set the window title, hide the rest of a report) or split one
    line into two."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def not_a_file(path: Path, wanted: str = "") -> str | None:
    """Why ``path`` is not a regular file to read, in words (``file not found``, a broken link or a
    link loop with where it points, a folder, pipe or device, then ``; give <wanted>``); None
    when it is one."""
    if path.is_file():
        return None
    link = dangling_link(path)
    if link:
        return f"{link}; fix the link or remove it"
    if not path.exists():
        return "file not found"
    return "not a regular file (a folder, pipe or device)" + (f"; give {wanted}" if wanted else "")


def dangling_link(path: Path) -> str | None:
    """For a symbolic link that leads nowhere, what it is: ``symbolic link loop (it points to T, which
    leads back to it)`` or ``broken symbolic link (it points to T, which does not exist)``; None for
    anything else. One wording for inputs, ``--json`` files and output folders alike."""
    if not path.is_symlink() or path.exists():
        return None
    target = os.readlink(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symbolic link loop (it points to {target}, which leads back to it)"
    return f"broken symbolic link (it points to {target}, which does not exist)"


def empty_path(what: str) -> UserError:
    """The refusal of an empty path (an unset shell variable, ``--out "$OUT"``): read as "not given" it
    wrote nothing, or into the current or the default folder, which ``--overwrite`` empties."""
    return UserError(f"{what} is empty; give a path (an unset shell variable?)")


def expanded_home(path: str, what: str) -> str:
    """``path`` with a leading ``~`` or ``~user`` expanded (one the shell left: quoted, after ``=``,
    or in a recipe); a UserError starting with ``what`` where it cannot be (no such user, or no
    home folder known to this process, where pathlib would raise RuntimeError later). Here, not in
    :mod:`pixelwise.runtime`, so that the CLI and the config, which import no torch, share it."""
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):
        user = path.split("/", 1)[0].split(os.sep, 1)[0]
        raise UserError(f"{what}: cannot expand {user} (no such user, or no home folder known to this process); "
                        "give the full path")
    return expanded
