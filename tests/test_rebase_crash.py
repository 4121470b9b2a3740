"""A rebase killed with SIGKILL in the middle, then --continue or --abort."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time


from builder import rebase as rb
from gitfixtures_rebase import lines, new_project, run

PATCHES = 100


def long_series(tmp_path):
    p = new_project(tmp_path)
    up = p.upstream
    files = {f"f{i:03d}.txt": lines(12, f"f{i}") for i in range(PATCHES)}
    p.pin = up.commit("base", files)
    p.entries = [
        (f"{i:04d}-f.patch", up.make_patch(p.pin, f"xpu: f{i}", {n: files[n].replace(" 6\n", " six\n")}))
        for i, n in enumerate(sorted(files))
    ]
    onto = up.commit("shift every file", {n: "top\n" + t for n, t in files.items()})
    p.write()
    p.refresh_mirror()
    return p, onto


def start_and_kill(plan, tmp_path) -> None:
    """Runs the rebase in another process and SIGKILLs it once a few patches are done."""
    plan_file = tmp_path / "plan.pickle"
    plan_file.write_bytes(pickle.dumps(plan))
    code = "import pickle,sys; from builder import rebase; rebase.start(pickle.load(open(sys.argv[1],'rb')))"
    # Its own process group, killed whole: what a closed terminal or `kill -9 -PGID` does, so no
    # orphaned git child writes on after the "crash".
    proc = subprocess.Popen([sys.executable, "-c", code, str(plan_file)], start_new_session=True)
    state = plan.state_dir / "vllm.json"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if state.is_file():
                if json.loads(state.read_text())["next"] >= 10:  # atomic writes: never a torn file
                    break
            assert proc.poll() is None, "the rebase ended before it could be killed"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    progress = json.loads(state.read_text())
    assert progress["phase"] == "replaying" and 10 <= progress["next"] < PATCHES


def test_kill_then_continue_gives_the_same_result(tmp_path):
    clean, onto = long_series(tmp_path / "a")
    expected = rb.start(clean.plan(onto, tmp_path / "a" / "work"))
    assert expected.status == "finished"

    p, onto2 = long_series(tmp_path / "b")
    assert onto2 == onto
    plan = p.plan(onto, tmp_path / "b" / "work")
    start_and_kill(plan, tmp_path)
    done = rb.resume(plan.state_dir, "vllm", "continue")
    assert done.status == "finished"
    assert [r.outcome for r in done.results] == ["moved"] * PATCHES
    assert done.results[-1].commit == expected.results[-1].commit
    assert run("rev-parse", "HEAD", cwd=plan.worktree) == expected.results[-1].commit
    a = {k: v for k, v in clean.snapshot().items()}
    b = p.snapshot()
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k != "stack.toml")


def test_kill_then_abort_restores_everything(tmp_path):
    p, onto = long_series(tmp_path)
    before = p.snapshot()
    plan = p.plan(onto, tmp_path / "work")
    start_and_kill(plan, tmp_path)
    report = rb.resume(plan.state_dir, "vllm", "abort")
    assert report.status == "aborted"
    assert p.snapshot() == before
    assert not plan.worktree.exists()
    assert not (plan.state_dir / "vllm.json").exists()
