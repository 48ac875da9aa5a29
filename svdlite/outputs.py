"""One run at a time per output: an advisory lock file beside the output, held while a run writes it.

A second run that would write the same video, schedule or batch folder is refused before it loads a model, instead
of both writing the same temporary file. The lock is the operating system's (`fcntl.flock`), so it is released when
its process ends, even killed; a leftover lock file of a dead run locks nothing. Where `fcntl` does not exist
(Windows) the lock is skipped.
"""
import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def lock_path(output: Path) -> Path:
    """The lock file of an output file or folder: `.<name>.lock` beside it (for a folder, the lock file given)."""
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def exclusive(lock: Path, what: str):
    """Hold `lock` (created if missing) for the block; FileExistsError naming `what` if another process holds it.

    The lock file is removed on leaving, unless another run has locked it meanwhile."""
    lock = Path(lock)
    if fcntl is None:
        yield
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FileExistsError(f"{what} is being written by another svdlite run"
                                  f"{f' (process {holder})' if holder else ''}; wait for it to finish, or choose "
                                  f"another output") from None
        try:  # the file may have been removed by its last holder between our open and lock: then lock the new one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
