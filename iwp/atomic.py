"""Artifacts written all-or-nothing: a directory is built under a temporary name beside its target and renamed
into place only when complete, so an interrupted run leaves the old directory or none, never a partial one.

Each staging directory `.<target>.<random>` has a lock file beside it, `.<target>.<random>.lock`, held (flock)
for as long as its builder lives. A killed builder's lock is released by the kernel, so the next staging in the
same folder removes what it left: leftovers never pile up, and a live build is never touched."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

LOCK = ".lock"
STAGING_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}$")   # `.<target>.` + mkstemp's 8 random characters
UNLOCKED_GRACE_S = 3600   # a staging directory with no lock file (older iwp) is stale after this long


def _free(lock: Path) -> bool:
    """Whether no live process holds `lock` (flock is released when its holder dies)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the staging directories in `parent` whose builder is gone; returns what was removed."""
    removed = []
    for path in Path(parent).glob(".*"):
        if not path.is_dir() or not STAGING_NAME.match(path.name):
            continue
        lock = path.with_name(path.name + LOCK)
        if lock.exists():
            stale = _free(lock)
        else:
            stale = time.time() - path.stat().st_mtime > UNLOCKED_GRACE_S
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(path)
    for lock in Path(parent).glob(f".*{LOCK}"):   # a builder killed between its lock and its directory
        base = lock.with_name(lock.name[: -len(LOCK)])
        if STAGING_NAME.match(base.name) and not base.exists() and _free(lock):
            lock.unlink(missing_ok=True)
    return removed


@contextmanager
def staging_directory(target: Path):
    """Yield a new, locked, empty staging directory beside `target` after sweeping stale ones. The caller moves it
    into place; on failure it is removed. Either way its lock is released."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    fd, lock_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=LOCK, dir=target.parent)
    lock = Path(lock_name)
    staging = lock.with_name(lock.name[: -len(LOCK)])
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        staging.mkdir(mode=0o755)
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
        os.chmod(staging, 0o755)  # reports and models are meant to be shared
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
