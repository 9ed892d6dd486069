"""Workers on a file study tell live workers from killed ones by locks. A worker that checks
whether it is alone must never lose its own hold by checking (a failed flock upgrade drops the
shared lock on Linux), or the next worker takes it for dead and fails its running trial."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from qsearch.search.jobs import hold_worker_lock, still_alone

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qsearch.search.jobs import hold_worker_lock, still_alone
    path = Path(sys.argv[1])
    fd, alone = hold_worker_lock(path)
    if sys.argv[2] == "check":
        print(still_alone(path), flush=True)
    else:
        print(alone, flush=True)
        time.sleep(60)
""")


def _spawn(path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], stdout=subprocess.PIPE, text=True)


def test_a_worker_that_checks_keeps_its_hold_and_a_killed_one_is_seen_dead(tmp_path):
    lock = tmp_path / "study.db.workers.lock"
    other = _spawn(lock, "hold")
    assert other.stdout.readline().strip() == "True"  # the first worker is alone
    try:
        fd, alone = hold_worker_lock(lock)
        assert not alone and not still_alone(lock)  # the other one is alive
    finally:
        other.kill()
        other.wait()
    assert still_alone(lock)  # killed: its liveness file is free (and removed)
    # this worker checked while the other was alive; a third one must still see it alive
    third = _spawn(lock, "check")
    assert third.stdout.readline().strip() == "False"
    third.wait()
