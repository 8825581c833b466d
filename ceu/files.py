"""Writing a run's files so that a crash, a kill or a full disk leaves the previous good version, never a truncated one.

Every file ceu writes (results, evaluation logs, plots, checkpoints, the saved model folder, a resumed run's log)
goes through :func:`replacing`: it is written under a temporary name in the same folder, flushed to disk and renamed
over the old one (``os.replace``, atomic on POSIX); a write that fails removes its temporary and leaves the old file.
What runs repeat (stage-one models, evaluations) is cached under :func:`cache_root`.
"""
import contextlib
import os
import shutil
import uuid
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """Yields a temporary path beside ``path`` (same suffix, so writers that infer the format from it still work);
    write the file, or a folder, there. On success it replaces ``path``; on any error it is removed and ``path`` is
    left as it was. A folder is swapped in by two renames (the old one is moved aside, then deleted): a crash between
    them leaves the old folder under ``.<name>.<id>.old``, never a half-written one at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    temporary = path.with_name(f".{path.name}.{token}.tmp{path.suffix}")
    try:
        yield temporary
        if temporary.is_dir():
            _replace_folder(temporary, path, path.with_name(f".{path.name}.{token}.old"))
        else:
            _flush_to_disk(temporary)
            os.replace(temporary, path)
    finally:
        _remove(temporary)
    _flush_to_disk(path.parent)


def cache_root() -> Path:
    """Where ceu caches what runs repeat (stage-one models, evaluations): ``$CEU_CACHE``, else
    ``$XDG_CACHE_HOME/ceu`` (``~/.cache/ceu``)."""
    if os.environ.get("CEU_CACHE"):
        return Path(os.environ["CEU_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ceu"


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically (see :func:`replacing`)."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _replace_folder(new: Path, path: Path, aside: Path) -> None:
    if path.exists():
        os.replace(path, aside)
    os.replace(new, path)
    _remove(aside)


def _flush_to_disk(path: Path) -> None:
    """fsync, so that a power loss after the rename cannot leave an empty file under the final name."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
