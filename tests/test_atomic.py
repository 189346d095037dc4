"""All-or-nothing directories: a killed builder's staging is swept by the next one; a live one never is."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iwp.atomic import UNLOCKED_GRACE_S, staged_directory, staging_directory, sweep_stale

HOLD = """
import sys, time
from iwp.atomic import staging_directory
with staging_directory(sys.argv[1]) as staging:
    (staging / "partial").write_text("x")
    print(staging, flush=True)
    time.sleep(60)
"""


def _start_builder(target: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_builders_staging_is_removed_by_the_next_and_a_live_one_is_kept(tmp_path):
    target = tmp_path / "engine-a"
    live, live_staging = _start_builder(target)
    dead, dead_staging = _start_builder(tmp_path / "engine-b")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert dead_staging.is_dir()                        # SIGKILL ran no cleanup
        with staged_directory(target) as staging:
            (staging / "done").write_text("ok")
        assert not dead_staging.exists() and not Path(f"{dead_staging}.lock").exists()
        assert live_staging.is_dir() and (live_staging / "partial").is_file()   # still building: untouched
        assert (target / "done").read_text() == "ok"
    finally:
        live.kill()
        live.wait()
    assert sweep_stale(tmp_path) == [live_staging]            # its holder gone, it goes too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine-a"]


def test_only_staging_names_are_swept(tmp_path):
    old = time.time() - 2 * UNLOCKED_GRACE_S
    keep = [tmp_path / ".git", tmp_path / ".venv", tmp_path / "visible.abcdefgh"]
    stale = tmp_path / ".engine-x.k3j_2a9z"        # an older iwp's staging, no lock file, old
    fresh = tmp_path / ".engine-y.q8w7e6r5"        # no lock, but recent: maybe a builder just starting
    for path in keep + [stale, fresh]:
        path.mkdir()
    for path in keep + [stale]:
        os.utime(path, (old, old))
    assert sweep_stale(tmp_path) == [stale]
    assert all(p.is_dir() for p in keep + [fresh])


def test_a_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_directory(tmp_path / "t") as staging:
            (staging / "x").write_text("partial")
            raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []
