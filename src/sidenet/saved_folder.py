"""The saved SideNet folder is replaced whole, so that a failing save leaves the old one as it was
(see :func:`replace_folder`); the user's own files in it (the CLI's plots and reports) are kept."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from sidenet.config import SAVED_FILES

__all__ = ["replace_folder"]


def _link_or_copy(source: str, target: str) -> None:
    # A hard link costs nothing and leaves the original untouched; copy where links are not allowed.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_user_files(folder: Path, staging: Path) -> None:
    """Link or copy into ``staging`` whatever the user keeps in ``folder`` beside the SideNet (the
    CLI's plots and reports), so that swapping the folders loses none of it."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in SAVED_FILES:
            continue
        target = staging / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def _swap_in(staging: Path, folder: Path) -> None:
    """Put the complete ``staging`` folder at ``folder`` with renames: the old folder moves aside, the
    new one moves in (the old one comes back if that fails), then the old one is deleted. A crash
    in between leaves the old folder beside it as ``.<name>.old-*``."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, old)
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def replace_folder(staging: Path, folder: Path) -> None:
    """Make the complete saved folder ``staging`` the SideNet folder ``folder``, keeping the user's own
    files from the old ``folder`` (see :func:`_swap_in` for what a crash leaves)."""
    _carry_user_files(folder, staging)
    _swap_in(staging, folder)
