"""Atomic file writing shared by training artifacts, the feature cache and export manifests.

A crash mid-write never leaves a truncated file that looks finished: data go to a temporary file in the
target's folder, which is renamed into place only when the write succeeded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(
    target: str | os.PathLike[str], *, mode: int | None = None, suffix: str = ".tmp"
) -> Iterator[Path]:
    """Yield a temporary path next to `target`; move it into place only if the block succeeds.

    `mode`: the file's permissions; None gives an ordinary file under the process umask (mkstemp alone
    would leave 0600). `suffix`: for writers that pick the format from the name (ITK: ".tmp.nii.gz").
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
