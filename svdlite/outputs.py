"""Writing outputs safely: one run at a time per output (an advisory lock file beside it, held while a run writes
it), and every file or folder written under a temporary name and renamed into place when complete, so that an
interrupted or failed run leaves no half-written output and an old output stays until the new one is complete
(`atomic_file`, `atomic_folder`); the tools' `--force` rule (`add_force`, `check_outputs`).

A second run that would write the same video, schedule or batch folder is refused before it loads a model, instead
of both writing the same temporary file. The lock is the operating system's (`fcntl.flock`), so it is released when
its process ends, even killed; a leftover lock file of a dead run locks nothing. Where `fcntl` does not exist
(Windows) the lock is skipped.
"""
import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def lock_path(output: Path) -> Path:
    """The lock file of an output file or folder: `.<name>.lock` beside it, in the same parent folder."""
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


FORCE_HELP = "overwrite outputs that exist (without it an existing output is refused with exit code 2)"


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def check_outputs(parser: argparse.ArgumentParser, paths, force: bool) -> None:
    """parser.error (exit code 2) for the first of `paths` that exists unless `force`, or whose folder is missing."""
    for path in map(Path, paths):
        if (path.exists() or path.is_symlink()) and not force:
            parser.error(f"{path} exists; pass --force to overwrite it")
        if not path.parent.is_dir():
            parser.error(f"cannot write {path}: folder {path.parent} does not exist")


def _give_usual_permissions(path: Path, mode: int) -> None:
    """Temporary files and folders are created private (0600 / 0700); the result gets what a plain write gets."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary file path beside `path` to write; when the block ends without error it replaces `path`
    (os.replace), otherwise it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _give_usual_permissions(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path):
    """Yield an empty temporary folder beside `path` to fill; when the block ends without error it takes the
    place of `path` (an existing `path` is moved aside first and removed after), otherwise it is removed."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        _give_usual_permissions(tmp, 0o777)
        if path.exists() or path.is_symlink():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path, text: str) -> None:
    """Write `text` to `path` through a temporary file (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)

