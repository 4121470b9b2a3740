"""horizon: per patch the newest upstream commit it still applies at (clean / offset / 3way /
already upstream) and the first that breaks it; for the stack, how far the pin can move. Over
600 first-parent commits written by one `git fast-import`, within ⌈log2 N⌉ + 2 probes a patch."""

from __future__ import annotations

import json
import math
import subprocess

from click.testing import CliRunner

from builder.cli import main
from gitfixtures_rebase import lines, new_project, run

N = 600


def fast_history(path, files: dict[str, str], events: dict[int, dict[str, str]], n: int) -> list[str]:
    """Commit 0 holds FILES, then n commits; commit i writes events[i] (else a noise file)."""
    stream = []
    for i in range(n + 1):
        changed = dict(files) if i == 0 else (events.get(i) or {f"noise/{i % 13}.txt": f"{i}\n"})
        msg = (f"upstream {i}" + (f" (#{1000 + i})" if i in events else "")).encode()
        stamp = 1767225600 + i * 3600
        stream.append(b"commit refs/heads/main\nmark :%d\n" % (i + 1))
        stream.append(b"author Up <up@example.invalid> %d +0000\ncommitter Up <up@example.invalid> %d +0000\n"
                      % (stamp, stamp))
        stream.append(b"data %d\n%s\n" % (len(msg), msg))
        if i:
            stream.append(b"from :%d\n" % i)
        for name, text in sorted(changed.items()):
            data = text.encode()
            stream.append(b"M 100644 inline %s\ndata %d\n%s\n" % (name.encode(), len(data), data))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=path, input=b"".join(stream), check=True, capture_output=True)
    run("reset", "-q", "--hard", "main", cwd=path)
    return run("rev-list", "--first-parent", "--reverse", "main", cwd=path).split()


def project(tmp_path):
    p = new_project(tmp_path)
    body = {f"{n}.txt": lines(30, n) for n in "abcd"}
    edit = lambda n, i, new: body[f"{n}.txt"].replace(f"{n} {i}\n", f"{new}\n")  # noqa: E731
    events = {
        150: {"a.txt": edit("a", 12, "a twelve")},        # a's context: only a three-way merge takes it now
        250: {"b.txt": edit("b", 10, "upstream b")},      # b's own line: b breaks here
        300: {"c.txt": "top\n" + body["c.txt"]},          # c moves: still applies, at an offset
        400: {"a.txt": edit("a", 12, "a twelve").replace("a 10\n", "upstream a\n")},  # a breaks here
        500: {"d.txt": edit("d", 10, "D")},               # upstream takes d's change
    }
    shas = fast_history(p.upstream.path, body, events, N)
    p.pin = shas[0]
    p.entries = [(f"000{k + 1}-{n}.patch", p.upstream.make_patch(p.pin, f"xpu: {n}", {f"{n}.txt": edit(n, 10, n.upper())}))
                 for k, n in enumerate("abcd")]
    p.write()
    return p, shas


def test_horizon_over_600_commits_within_the_probe_bound(tmp_path):
    p, shas = project(tmp_path)
    before = p.snapshot()
    png = tmp_path / "horizon.png"
    result = CliRunner(mix_stderr=False).invoke(main, [
        "--stack", str(p.stack_file), "--work-dir", str(tmp_path / "work"), "--json",
        "horizon", "lab", "--to", "main", "--plot", str(png)])
    assert result.exit_code == 0, result.stderr
    h = json.loads(result.stdout)
    assert h["commits"] == N and h["bound"] == math.ceil(math.log2(N)) + 2
    rows = {r["name"]: r for r in h["patches"]}
    a, b, c, d = (rows[f"000{k + 1}-{n}.patch"] for k, n in enumerate("abcd"))
    assert a["applies_until"]["sha"] == shas[399] and a["mode"] == "3way"
    assert a["breaking"]["sha"] == shas[400] and a["breaking"]["pr"] == 1400 and a["at_to"] == "conflict"
    assert b["applies_until"]["sha"] == shas[249] and b["mode"] == "clean" and b["breaking"]["sha"] == shas[250]
    assert c["breaking"] is None and c["applies_until"]["sha"] == shas[-1] and c["mode"] == "offset"
    assert d["breaking"] is None and d["mode"] == "already-applied"
    assert h["stack_until"]["sha"] == shas[249]
    assert all(r["probes"] <= h["bound"] for r in h["patches"])
    # the searches share their probes: far fewer than one per commit
    assert h["probes"] <= 2 * h["bound"] + 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and h["plot"] == str(png)

    # without --to: the upstream's HEAD (main here)
    table = CliRunner(mix_stderr=False).invoke(main, [
        "--stack", str(p.stack_file), "--work-dir", str(tmp_path / "work"), "horizon", "lab"])
    assert table.exit_code == 0, table.stderr
    assert f"the pin can move to {shas[249][:12]}" in table.stdout
    assert p.snapshot() == before and not (tmp_path / "work" / "lab").exists()  # nothing written, nothing checked out


def test_horizon_figure_rows_are_green_then_red(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from builder import horizon as hz
    from builder.config import load_config
    from builder.settings import load_settings

    p, shas = project(tmp_path)
    cfg = load_config(p.stack_file)
    h = hz.horizon_stack(load_settings(cfg, work_dir=tmp_path / "work"), cfg, "lab", None, shas[-1])
    fig = hz.horizon_figure(h)
    ax = fig.axes[0]
    bars = [(round(b.get_y() + b.get_height() / 2), matplotlib.colors.to_hex(b.get_facecolor())) for b in ax.patches]
    green, red = matplotlib.colors.to_hex("tab:green"), matplotlib.colors.to_hex("tab:red")
    # a and b: green then red; c and d: green all the way
    assert bars == [(0, green), (0, red), (1, green), (1, red), (2, green), (3, green)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"xpu/000{k + 1}-{n}.patch" for k, n in enumerate("abcd")]
