"""bisect: the first upstream commit that breaks each patch, within ⌈log2 N⌉ + 2 probes."""

from __future__ import annotations

import math


from builder import bisection as bs
from builder import rebase as rb
from gitfixtures_rebase import lines, new_project, replay_old, run


def history(tmp_path, n: int, events: dict[int, dict[str, str]]):
    """n upstream commits after the pin; commit i (1-based) applies events[i] when present."""
    p = new_project(tmp_path)
    up = p.upstream
    body = {name: lines(30, name) for name in ("a.txt", "b.txt", "c.txt")}
    p.pin = up.commit("base", body)
    p.entries = [
        ("0001-a.patch", up.make_patch(p.pin, "xpu: a", {"a.txt": body["a.txt"].replace("a.txt 10\n", "A\n")})),
        ("0002-b.patch", up.make_patch(p.pin, "xpu: b", {"b.txt": body["b.txt"].replace("b.txt 10\n", "B\n")})),
        ("0003-c.patch", up.make_patch(p.pin, "xpu: c", {"c.txt": body["c.txt"].replace("c.txt 10\n", "C\n")})),
    ]
    shas = [p.pin]
    for i in range(1, n + 1):
        files = {f"noise/{i % 7}.txt": f"{i}\n"}
        for name, text in events.get(i, {}).items():
            files[name] = text
        shas.append(up.commit(f"upstream {i}", files))
    p.refresh_mirror()
    items = replay_old(p.mirror, p.pin, [(p.series, n_, d) for n_, d in p.entries])
    return p, shas, rb.replay_patches(p.mirror, p.pin, items), body


def test_finds_breaking_commit_per_patch_and_newest_clean(tmp_path):
    n = 40
    p0 = lines(30, "a.txt")
    events = {
        17: {"a.txt": p0.replace("a.txt 11\n", "a eleven\n")},  # breaks a
        29: {"b.txt": lines(30, "b.txt").replace("b.txt 9\n", "b nine\n")},  # breaks b
        33: {"c.txt": "top\n" + lines(30, "c.txt")},  # only moves c: still applies
    }
    p, shas, items, _ = history(tmp_path, n, events)
    report = bs.bisect(p.mirror, p.pin, shas[-1], items, "vllm")
    assert report.commits == n
    assert report.bound == math.ceil(math.log2(n)) + 2
    found = {b.name: b for b in report.patches}
    assert set(found) == {"0001-a.patch", "0002-b.patch"}
    assert found["0001-a.patch"].commit.sha == shas[17] and found["0001-a.patch"].commit.subject == "upstream 17"
    assert found["0001-a.patch"].good == shas[16]
    assert found["0002-b.patch"].commit.sha == shas[29]
    assert all(b.probes <= report.bound for b in report.patches)
    assert report.newest_clean.sha == shas[16]
    assert report.probes <= 2 * report.bound  # the two searches share the endpoints and some probes


def test_everything_applies_at_onto(tmp_path):
    p, shas, items, _ = history(tmp_path, 9, {})
    report = bs.bisect(p.mirror, p.pin, shas[-1], items)
    assert report.patches == () and report.newest_clean.sha == shas[-1] and report.probes == 2


def test_non_monotone_history_gives_a_verified_transition(tmp_path):
    a = lines(30, "a.txt")
    broken = a.replace("a.txt 11\n", "a eleven\n")
    events = {8: {"a.txt": broken}, 12: {"a.txt": a}, 20: {"a.txt": broken}}
    p, shas, items, _ = history(tmp_path, 24, events)
    report = bs.bisect(p.mirror, p.pin, shas[-1], items[:1])
    (b,) = report.patches
    assert b.commit.sha in (shas[8], shas[20])
    # Whatever transition the search lands on is real: fails there, applies at its first parent.
    at = bs.probe(p.mirror, b.commit.sha, items[:1])
    parent = bs.probe(p.mirror, run("rev-parse", f"{b.commit.sha}^", cwd=p.mirror), items[:1])
    assert at == (False,) and parent == (True,) and b.good == run("rev-parse", f"{b.commit.sha}^", cwd=p.mirror)


def test_search_probe_count_is_logarithmic():
    for n in (1, 2, 3, 10, 1000, 1025):
        line = list(range(n + 1))
        for first_bad in (1, n // 2 or 1, n):
            seen = []
            hi, probes = bs.search(line, lambda c: seen.append(c) or c < first_bad)
            assert hi == first_bad
            assert probes == len(seen) <= math.ceil(math.log2(n)) if n > 1 else probes == 0
