"""How the tools in this folder write their outputs (a helper module, not a tool).

Every output path is checked before any work: one that exists is refused unless `--force`, as is one whose folder
does not exist; both are argparse errors (a message naming the path, exit code 2). Each output is written under a
temporary name in its own folder (`.NAME.XXXX.partial`) and renamed into place when complete, so an interrupted
or failed run leaves no half-written file or folder and, with `--force`, the old output stays until the new one
is complete.
"""
import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

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
    """Write `text` to `path` through a temporary file (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)

