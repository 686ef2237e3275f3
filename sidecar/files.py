"""Writing secret files: private keys the CLI makes (`keygen`, `certs`)."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write `data` to `path` with mode 0600; an existing file is kept unless `overwrite`.

    Raises FileExistsError naming the path: losing a private key silently
    would lock its service out of the mesh.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path}: a private key is already there; not replacing it") from None
    with os.fdopen(fd, "wb") as f:
        # The mode given to open() only applies to a new file.
        os.fchmod(f.fileno(), 0o600)
        f.write(data)
