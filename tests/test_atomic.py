"""All-or-nothing directories: a killed builder's staging is swept by the next one; a live one never is."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iwp.atomic import staged_directory, staging_directory, sweep_stale

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


def test_only_unlocked_staging_names_are_swept(tmp_path):
    """Hidden directories of the user's, old or not, with or without a lock-looking file, are never touched."""
    users = [tmp_path / n for n in (".git", ".venv", ".ssh.20240101", ".vim.backup_1", ".config.old_copy",
                                    ".engine-x.k3j_2a9z", "visible.iwp-staging-abcdefgh")]
    for path in users:
        path.mkdir()
    (tmp_path / ".vim.backup_1.lock").write_text("")
    (tmp_path / "visible.iwp-staging-abcdefgh.lock").write_text("")
    stale = tmp_path / ".engine-y.iwp-staging-q8w7e6r5"       # a killed builder's: unlocked lock file beside it
    stale.mkdir()
    (tmp_path / ".engine-y.iwp-staging-q8w7e6r5.lock").write_text("")
    assert sweep_stale(tmp_path) == [stale]
    assert all(p.is_dir() for p in users)
    assert not (tmp_path / ".engine-y.iwp-staging-q8w7e6r5.lock").exists()


def test_a_failed_build_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_directory(tmp_path / "t") as staging:
            (staging / "x").write_text("partial")
            raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []
