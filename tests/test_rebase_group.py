"""One rebase across two sources (`--onto A=REF --onto B=REF`): one state, one --continue/--skip/
--abort, nothing of the project written until both replays are done, the stack's other sources
untouched; and the maintainer's whole loop: vendor, rebase, resolve, continue, export, check."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from builder import patches as pt
from builder import rebase as rb
from builder.cli import main
from gitfixtures_rebase import Upstream, lines, run

STACK = """\
# Two sources move together; the kernels stay where they are.
[sources.vllm]
url = "{vllm_url}"
commit = "{vllm_pin}"  # vllm pin

[sources.scaler]
url = "{scaler_url}"
commit = "{scaler_pin}"  # scaler pin

[sources.kernels]
url = "{kernels_url}"
commit = "{kernels_pin}"  # built unpatched

[series.xpu]
source = "vllm"
{xpu_patches}
[series.esimd]
source = "scaler"

[stacks.lab]
series = ["xpu", "esimd"]
sources = ["kernels"]
"""


class Fixture:
    def __init__(self, tmp_path, remote: bool = False):
        self.tmp = tmp_path
        self.root = tmp_path / "project"
        self.root.mkdir()
        self.vllm, self.scaler, kernels = (Upstream(tmp_path / n) for n in ("vllm", "scaler", "kernels"))
        self.kernels_pin = kernels.commit("k", {"k.txt": "k\n"})
        kernels.commit("k2", {"k.txt": "k2\n"})
        v = {n: lines(30, n) for n in ("a.txt", "e.txt")}
        s = {n: lines(30, n) for n in ("s.txt", "t.txt")}
        self.vllm_pin = self.vllm.commit("base", v)
        self.scaler_pin = self.scaler.commit("base", s)
        xpu = [("0001-a.patch", self.vllm.make_patch(self.vllm_pin, "xpu: a", {"a.txt": v["a.txt"].replace("a.txt 20\n", "A20\n")})),
               ("0002-e.patch", self.vllm.make_patch(self.vllm_pin, "xpu: e", {"e.txt": v["e.txt"].replace("e.txt 5\n", "ours\n")}))]
        esimd = [("0001-s.patch", self.scaler.make_patch(self.scaler_pin, "esimd: s", {"s.txt": s["s.txt"].replace("s.txt 9\n", "mine\n")})),
                 ("0002-t.patch", self.scaler.make_patch(self.scaler_pin, "esimd: t", {"t.txt": s["t.txt"].replace("t.txt 2\n", "T2\n")}))]
        self.vllm.commit("shift a", {"a.txt": "new\n" + v["a.txt"]})
        self.vllm_onto = self.vllm.commit("rework e (#4242)", {"e.txt": v["e.txt"].replace("e.txt 5\n", "theirs\n")})
        self.scaler_onto = self.scaler.commit("rework s", {"s.txt": s["s.txt"].replace("s.txt 9\n", "upstream\n")})
        for folder, entries in (("esimd", esimd),) + ((() if remote else (("xpu", xpu),))):
            (self.root / "patches" / folder).mkdir(parents=True)
            for name, data in entries:
                (self.root / "patches" / folder / name).write_bytes(data)
            (self.root / "patches" / folder / "series").write_text("".join(f"{n}\n" for n, _ in entries))
        xpu_patches = ""
        if remote:
            served = tmp_path / "served"
            served.mkdir()
            rows = []
            for name, data in xpu:
                (served / f"{name}.gz.b64").write_bytes(pt.encode(data, "gz.b64"))
                rows.append(f'  {{ url = "{served.as_uri()}/{name}.gz.b64", sha256 = "{hashlib.sha256(data).hexdigest()}" }},')
            xpu_patches = "patches = [  # the lab's files\n" + "\n".join(rows) + "\n]\n"
        self.stack_file = self.root / "stack.toml"
        self.stack_file.write_text(STACK.format(
            vllm_url=self.vllm.path, vllm_pin=self.vllm_pin, scaler_url=self.scaler.path, scaler_pin=self.scaler_pin,
            kernels_url=kernels.path, kernels_pin=self.kernels_pin, xpu_patches=xpu_patches))

    def cli(self, *args):
        result = CliRunner(mix_stderr=False).invoke(
            main, ["--stack", str(self.stack_file), "--work-dir", str(self.tmp / "work"), "--json", *args])
        return result.exit_code, (json.loads(result.stdout) if result.stdout.strip() else None), result.stderr

    def snapshot(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.root)): p.read_bytes() for p in sorted(self.root.rglob("*"))
                if p.is_file() and "work" not in p.relative_to(self.root).parts}

    def wt(self, source: str):
        return self.tmp / "work" / "lab" / source

    def resolve(self, source: str, name: str, text: str) -> None:
        (self.wt(source) / name).write_text(text)
        run("add", name, cwd=self.wt(source))

    def onto(self) -> tuple[str, ...]:
        return ("--onto", f"vllm={self.vllm_onto}", "--onto", f"scaler={self.scaler_onto}")


def test_two_sources_one_conflict_each_resolved_and_continued(tmp_path):
    f = Fixture(tmp_path)
    before = f.snapshot()
    code, out, err = f.cli("rebase", "lab", *f.onto())
    assert code == 8, err
    assert out["status"] == "stopped" and out["stopped_source"] == "vllm"
    assert [s["status"] for s in out["sources"]] == ["stopped", "pending"]
    assert out["stopped_at"]["conflicted_files"] == ["e.txt"]
    assert f.snapshot() == before  # nothing of the project moves before every replay is done

    # one state: a bare --continue finds it (not "2 rebases in progress")
    code, out, err = f.cli("rebase", "--continue")
    assert code == 8 and "unresolved conflicts in e.txt" in err
    f.resolve("vllm", "e.txt", lines(30, "e.txt").replace("e.txt 5\n", "both\n"))
    code, out, err = f.cli("rebase", "--continue")
    assert code == 8, err
    assert out["stopped_source"] == "scaler" and [s["status"] for s in out["sources"]] == ["replayed", "stopped"]
    assert out["stopped_at"]["conflicted_files"] == ["s.txt"]
    assert f.snapshot() == before
    # apply and export refuse meanwhile, for both sources
    code, _, err = f.cli("export", "lab", "--source", "vllm")
    assert code == 9 and "in progress" in err

    f.resolve("scaler", "s.txt", lines(30, "s.txt").replace("s.txt 9\n", "merged\n"))
    code, out, err = f.cli("rebase", "--continue")
    assert code == 0, err
    assert out["status"] == "finished" and [s["status"] for s in out["sources"]] == ["finished", "finished"]
    toml = f.stack_file.read_text()
    assert f'commit = "{f.vllm_onto}"  # vllm pin' in toml and f'commit = "{f.scaler_onto}"  # scaler pin' in toml
    assert f'commit = "{f.kernels_pin}"  # built unpatched' in toml  # the other source: untouched
    assert not (tmp_path / "work" / "lab" / "kernels").exists()
    assert b"+both" in (f.root / "patches/xpu/0002-e.patch").read_bytes()
    assert b"+merged" in (f.root / "patches/esimd/0001-s.patch").read_bytes()
    assert not (tmp_path / "work" / "lab" / ".rebase").exists()
    assert (tmp_path / "work" / "lab" / "rebase-vllm.md").is_file() and (tmp_path / "work" / "lab" / "rebase-scaler.md").is_file()


def test_abort_after_the_second_stop_puts_both_back_and_skip_drops(tmp_path):
    f = Fixture(tmp_path)
    before = f.snapshot()
    code, out, _ = f.cli("rebase", "lab", *f.onto())
    assert code == 8
    code, out, err = f.cli("rebase", "--skip")  # drops xpu's e patch, goes on to scaler
    assert code == 8, err
    assert out["stopped_source"] == "scaler"
    assert [r["dropped"] for r in out["sources"][0]["results"]] == [False, True]
    code, out, err = f.cli("rebase", "--abort")
    assert code == 0, err
    assert out["status"] == "aborted" and [s["source"] for s in out["sources"]] == ["vllm", "scaler"]
    assert f.snapshot() == before
    assert not f.wt("vllm").exists() and not f.wt("scaler").exists()  # the rebase made them: gone again
    assert not (tmp_path / "work" / "lab" / ".rebase").exists()

    # starting with a source the stack does not patch refuses before anything is set up
    code, out, err = f.cli("rebase", "lab", "--onto", f"vllm={f.vllm_onto}", "--onto", "kernels=main")
    assert code == 8 and "no series for source 'kernels'" in err
    assert not (tmp_path / "work" / "lab" / ".rebase").exists()
    code, out, err = f.cli("rebase", "lab", "--onto", f.vllm_onto, "--onto", f"scaler={f.scaler_onto}")
    assert code == 8 and "need the source" in out["message"]


def test_killed_during_the_export_is_finished_by_continue(tmp_path, monkeypatch):
    f = Fixture(tmp_path)
    f.cli("rebase", "lab", *f.onto())
    f.resolve("vllm", "e.txt", lines(30, "e.txt").replace("e.txt 5\n", "both\n"))
    f.cli("rebase", "--continue")
    f.resolve("scaler", "s.txt", lines(30, "s.txt").replace("s.txt 9\n", "merged\n"))
    real, calls = rb.finish, []

    def dies_on_the_second(state_dir, state, **kw):
        calls.append(state.source)
        if len(calls) == 2:
            raise KeyboardInterrupt  # vllm's files and pin are written, scaler's not yet
        return real(state_dir, state, **kw)

    monkeypatch.setattr(rb, "finish", dies_on_the_second)
    code, _, _ = f.cli("rebase", "--continue")
    assert code == 130
    assert f'commit = "{f.vllm_onto}"' in f.stack_file.read_text()
    assert f'commit = "{f.scaler_pin}"' in f.stack_file.read_text()
    monkeypatch.setattr(rb, "finish", real)
    code, out, err = f.cli("rebase", "--continue")
    assert code == 0, err
    assert out["status"] == "finished"
    toml = f.stack_file.read_text()
    assert f'commit = "{f.vllm_onto}"' in toml and f'commit = "{f.scaler_onto}"' in toml
    code, _, err = f.cli("export", "lab", "--check")
    assert code == 0, err


def test_the_whole_loop_vendor_rebase_two_sources_resolve_export_check(tmp_path):
    f = Fixture(tmp_path, remote=True)
    code, out, err = f.cli("vendor", "--stack", "lab")
    assert code == 0 and out["series"] == ["xpu"], err
    assert "# patches = [  # the lab's files" in f.stack_file.read_text()
    code, out, err = f.cli("rebase", "lab", *f.onto(), "--markdown", str(tmp_path / "pr.md"))
    assert code == 8 and out["stopped_source"] == "vllm", err
    assert out["stopped_at"]["breaking"]["pr"] == 4242
    assert "— PR #4242" in (tmp_path / "pr.md").read_text()
    f.resolve("vllm", "e.txt", lines(30, "e.txt").replace("e.txt 5\n", "both\n"))
    code, out, err = f.cli("rebase", "--continue")
    assert code == 8 and out["stopped_source"] == "scaler", err
    f.resolve("scaler", "s.txt", lines(30, "s.txt").replace("s.txt 9\n", "merged\n"))
    code, out, err = f.cli("rebase", "--continue", "--markdown", str(tmp_path / "pr.md"))
    assert code == 0, err
    md = (tmp_path / "pr.md").read_text()
    assert md.startswith("## Rebase of stack `lab` (2 sources): finished")
    assert "### Rebase of `vllm`" in md and "### Rebase of `scaler`" in md
    # export writes nothing more: the rebase already wrote the canonical files
    code, out, err = f.cli("export", "lab")
    assert code == 0, err
    assert all(c["action"] in ("unchanged", "kept") for r in out for c in r["patches"])
    code, _, err = f.cli("export", "lab", "--check")
    assert code == 0, err
    # check at the new pins (stack.toml's now): every patch applies as is (a only moved, and a
    # moved patch is kept byte for byte: no churn, so it applies at an offset)
    code, out, err = f.cli("check", "lab")
    assert code == 0, err
    verdicts = {s["source"]: [p["outcome"] for p in s["patches"]] for s in out[0]["sources"]}
    assert verdicts == {"vllm": ["offset", "clean"], "scaler": ["clean", "clean"], "kernels": []}
    assert [s["base"] for s in out[0]["sources"]] == [f.vllm_onto, f.scaler_onto, f.kernels_pin]
    # and apply from the exported files lands on the very commits the rebase made
    heads = {s: run("rev-parse", "HEAD", cwd=f.wt(s)) for s in ("vllm", "scaler")}
    code, _, err = f.cli("apply", "lab")
    assert code == 0, err
    assert {s: run("rev-parse", "HEAD", cwd=f.wt(s)) for s in ("vllm", "scaler")} == heads


@pytest.mark.parametrize("values,message", [
    (["vllm=a", "vllm=b"], "twice"),
])
def test_onto_parsing(values, message):
    from builder.errors import RebaseError
    from builder.rebase_group import parse_onto
    with pytest.raises(RebaseError, match=message):
        parse_onto(values, None)
    assert parse_onto(["vllm=abc", "scaler=v1.0"], None) == [("vllm", "abc"), ("scaler", "v1.0")]
    assert parse_onto(["refs/tags/a=b"], "vllm") == [(None, "refs/tags/a=b")]


def test_a_dirty_second_worktree_refuses_the_start_and_puts_the_first_back(tmp_path):
    f = Fixture(tmp_path)
    code, _, err = f.cli("apply", "lab")
    assert code == 0, err
    heads = {s: run("rev-parse", "HEAD", cwd=f.wt(s)) for s in ("vllm", "scaler")}
    (f.wt("scaler") / "t.txt").write_text("edited by hand\n")
    before = f.snapshot()
    code, out, err = f.cli("rebase", "lab", *f.onto())
    assert code == 8 and "uncommitted changes" in out["message"]
    assert {s: run("rev-parse", "HEAD", cwd=f.wt(s)) for s in ("vllm", "scaler")} == heads
    assert run("symbolic-ref", "HEAD", cwd=f.wt("vllm")) == "refs/heads/stackbuild/lab"
    assert (f.wt("scaler") / "t.txt").read_text() == "edited by hand\n"
    assert f.snapshot() == before and not (tmp_path / "work" / "lab" / ".rebase").exists()


def test_a_start_killed_while_setting_up_is_undone_by_the_next_run(tmp_path, monkeypatch):
    from builder import rebase_group as group

    f = Fixture(tmp_path)
    before = f.snapshot()
    real_begin, real_abort, calls = rb.begin, group._abort, []

    def begin(plan, **kw):
        calls.append(plan.source)
        if len(calls) == 2:
            raise KeyboardInterrupt  # with the undo below switched off: as if killed (kill -9) here
        return real_begin(plan, **kw)

    monkeypatch.setattr(rb, "begin", begin)
    monkeypatch.setattr(group, "_abort", lambda *a: None)
    code, _, _ = f.cli("rebase", "lab", *f.onto())
    assert code == 130 and (tmp_path / "work/lab/.rebase/_group.json").is_file()
    monkeypatch.setattr(group, "_abort", real_abort)
    code, out, err = f.cli("rebase", "--continue")
    assert code == 8 and "interrupted while it was starting; it has been undone" in err
    assert f.snapshot() == before and not f.wt("vllm").exists()
    assert not (tmp_path / "work" / "lab" / ".rebase").exists()


def test_one_onto_with_a_source_name_is_the_single_source_rebase(tmp_path):
    f = Fixture(tmp_path)
    code, out, err = f.cli("rebase", "lab", "--onto", f"scaler={f.scaler_onto}")
    assert code == 8, err
    assert out["source"] == "scaler" and out["stopped_at"]["conflicted_files"] == ["s.txt"]  # a plain Report
    assert not (tmp_path / "work/lab/.rebase/_group.json").exists() and not f.wt("vllm").exists()
    code, out, err = f.cli("rebase", "--skip")
    assert code == 0 and out["status"] == "finished", err
    toml = f.stack_file.read_text()
    assert f'commit = "{f.scaler_onto}"' in toml and f'commit = "{f.vllm_pin}"' in toml
