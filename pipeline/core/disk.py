"""Local files and folders as `store clean` and the cache count and remove them: sizes in bytes, removal that
tolerates what went away meanwhile."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def tree_size(path: str | Path) -> int:
    """Bytes of the file at ``path``, or of every file under the folder at ``path`` (links not followed);
    0 for what does not exist."""
    path = Path(path)
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except FileNotFoundError:
        return 0
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(folder) / name).lstat().st_size
            except FileNotFoundError:
                continue
    return total


def remove_path(path: str | Path) -> None:
    """Remove the file or folder at ``path``; nothing when it is already gone."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
