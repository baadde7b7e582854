"""Containment: a path that a file names is used only if it lies inside the checkpoint directory.

The state file (``checkpoint``), the manager's sidecar and the paths derived from them are
data, and data can be stale, copied from elsewhere or hostile. A checkpoint directory must
never make us read, rename or delete anything outside itself, nor fetch a URL it names.
So every path taken from such a file goes through ``resolve_inside``: it is used only if it
resolves inside the directory, on the same filesystem or bucket; anything else is ignored
with a warning that names the entry and the file that named it.

Inside means, on the text of the path (``..`` is refused outright), and for a local directory
also on disk: the directory that holds the entry, symlinks resolved, must be the checkpoint
directory or lie under it, so a symlinked subdirectory cannot lead elsewhere:

* local directory ``/d``: a relative entry joined onto ``/d``, an absolute entry under ``/d/``,
  or ``file:///d/...``; no other scheme (an ``http://`` or ``s3://`` entry is never fetched);
* remote directory ``s3://bucket/d``: a relative entry, or a URL of the same scheme under
  ``s3://bucket/d/``; an absolute local path or another bucket is outside.

An absolute local entry that is lexically elsewhere but whose real path lies under the
directory's real path (``/tmp`` reached through a symlink) is the same file, so it is kept.
"""

from __future__ import annotations

import os
import posixpath
import warnings


def resolve_inside(directory: str, entry: str, source: str) -> str | None:
    """The full path of ``entry`` if it resolves inside ``directory``; else None, with a warning.

    ``directory`` is a full path as ``Storage.for_path`` returns it (absolute local path, or
    a URL with its scheme); ``source`` names the file the entry came from, for the warning.
    """
    path, why = _resolve(directory, entry)
    if path is None:
        warnings.warn(f"{source}: ignoring {entry!r}: {why}; only paths inside the checkpoint directory "
                      f"{directory} are used",
                      RuntimeWarning, stacklevel=2)
    return path


def is_inside(directory: str, path: str) -> bool:
    """True if ``path`` (full, as the checkpoint code builds it) lies inside ``directory``."""
    return _resolve(directory, path)[0] is not None


def _resolve(directory: str, entry: str) -> tuple[str | None, str]:
    entry = os.fspath(entry)
    if not entry or "\x00" in entry:
        return None, "it is empty or holds a NUL"
    if ".." in _components(entry):
        return None, "it has a '..' component"
    if "://" in directory:
        return _resolve_remote(directory.rstrip("/"), entry)
    return _resolve_local(directory, entry)


def _components(entry: str) -> list[str]:
    rest = entry.split("://", 1)[1] if "://" in entry else entry
    return rest.replace(os.sep, "/").split("/")


def _resolve_remote(directory: str, entry: str) -> tuple[str | None, str]:
    scheme = directory.split("://", 1)[0]
    if "://" not in entry:
        if entry.startswith("/"):
            return None, "it is an absolute local path"
        return _strictly_under(directory, posixpath.join(directory, entry), "/")
    if entry.split("://", 1)[0] != scheme:
        return None, f"it is a {entry.split('://', 1)[0]}:// URL"
    return _strictly_under(directory, entry.rstrip("/"), "/")


def _resolve_local(directory: str, entry: str) -> tuple[str | None, str]:
    if "://" in entry:
        scheme, rest = entry.split("://", 1)
        if scheme not in ("file", "local"):
            return None, f"it is a {scheme}:// URL"
        entry = rest
    directory = os.path.normpath(directory)
    path = os.path.normpath(entry if os.path.isabs(entry) else os.path.join(directory, entry))
    inside, why = _strictly_under(directory, path, os.sep)
    if inside is None and os.path.isabs(entry):
        real_dir, real = os.path.realpath(directory), os.path.realpath(path)
        if _strictly_under(real_dir, real, os.sep)[0] is not None:
            return path, ""
    if inside is not None and not _parent_really_inside(directory, path):
        return None, "it goes through a symlinked directory that leads elsewhere"
    return inside, why


def _parent_really_inside(directory: str, path: str) -> bool:
    """The directory holding ``path``, symlinks resolved, is the checkpoint directory or under it.

    Inside on the text, ``sub/model.ckpt-1`` still leads elsewhere when ``sub`` is a symlink
    to another directory, and deleting that checkpoint would delete files there. (A symlink
    as the last component is a file of the directory: removing it removes the link.)
    """
    real_dir = os.path.realpath(directory)
    parent = os.path.realpath(os.path.dirname(path))
    return parent == real_dir or _strictly_under(real_dir, parent, os.sep)[0] is not None


def _strictly_under(directory: str, path: str, sep: str) -> tuple[str | None, str]:
    head = directory if directory.endswith(sep) else directory + sep
    if path.startswith(head) and len(path) > len(head):
        return path, ""
    return None, "it points elsewhere"
