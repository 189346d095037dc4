"""Artifacts written all-or-nothing: a directory is built under a temporary name beside its target and renamed
into place only when complete, so an interrupted run leaves the old directory or none, never a partial one.

Each staging directory `.<target>.iwp-staging-<random>` has a lock file beside it (the same name + `.lock`),
held with flock for as long as its builder lives. A killed builder's lock is released by the kernel, so the
next staging in the same folder removes what it left: leftovers never pile up, and a live build is never
touched. Only names of that exact form are ever swept, so nothing of the user's can match."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

LOCK = ".lock"
STAGING = ".iwp-staging-"
STAGING_NAME = re.compile(r"^\..+\.iwp-staging-[a-z0-9_]{8}$")   # mkstemp's 8 random characters at the end


def _locked_free(lock: Path):
    """An fd holding `lock`'s flock when no live process holds it (flock is released when its holder dies);
    None when someone holds it, or it is gone or not ours to open."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except (FileNotFoundError, PermissionError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the staging directories in `parent` whose builder is gone; returns what was removed."""
    removed = []
    for lock in sorted(Path(parent).glob(f".*{STAGING}*{LOCK}")):
        staging = lock.with_name(lock.name[: -len(LOCK)])
        if not STAGING_NAME.match(staging.name):
            continue
        fd = _locked_free(lock)
        if fd is None:
            continue
        try:   # removed while holding the lock, so a builder that takes it meanwhile sees its lock file gone
            if staging.is_dir() and not staging.is_symlink():
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


def _new_lock(target: Path) -> tuple[int, Path]:
    """A fresh lock file beside `target`, flocked by us. A sweeper may take a lock in the moment before we flock
    it and unlink it; flock then holds an unlinked file, so check it is still the one on disk, else start over."""
    while True:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}{STAGING}", suffix=LOCK, dir=target.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(name).st_ino == os.fstat(fd).st_ino:
                return fd, Path(name)
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def staging_directory(target: Path):
    """Yield a new, locked, empty staging directory beside `target` after sweeping stale ones. The caller moves it
    into place; on failure it is removed. Either way its lock is released."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    fd, lock = _new_lock(target)
    staging = lock.with_name(lock.name[: -len(LOCK)])
    try:
        staging.mkdir(mode=0o755)
        os.chmod(staging, 0o755)   # mkdir's mode is masked by the umask; reports and engines are meant to be shared
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def staged_directory(target: Path):
    """Yield an empty staging directory; on success it becomes `target` (replacing it), on failure it is removed."""
    target = Path(target)
    with staging_directory(target) as staging:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)


def write_file(path: Path, text: str) -> None:
    """Replace one file all-or-nothing: written beside it under a temporary name, then renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
