"""The background lane's process handling (tests/runs.py): a hung job ends, children and all."""

import os
import time

from tests.runs import run_job


def test_a_hung_job_is_killed_with_its_children_and_reported(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"  # a child that would outlive a kill of the shell alone
    t0 = time.monotonic()
    (rc, text), = run_job([(["bash", "-c", script], dict(os.environ))], timeout=2)
    assert rc is None and "did not finish within 2 s (hang)" in text and time.monotonic() - t0 < 30
    child = int(pidfile.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        if not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split(")")[1][:3]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"child {child} of the hung job still runs")

