"""The parity gate: stackbuild's engine against `git apply --cached` on adversarial patches.

bench/fuzz_apply.py holds the generator and the oracle (see its docstring for the invariant);
here it runs seeded with a fixed budget, and parse_patch meets arbitrary bytes.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from builder.errors import PatchError
from builder.patches import parse_patch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fuzz_apply  # noqa: E402

CASES = 3000


@pytest.mark.fuzz
def test_engine_agrees_with_git_apply_on_adversarial_patches():
    report = fuzz_apply.run(CASES, seed=20261201)
    assert report.cases == CASES
    assert not report.classes, fuzz_apply.describe(report)


def test_the_gate_can_fail(tmp_path, monkeypatch):
    """An engine that accepts everything unchanged is caught on both counts: a patch git refuses
    ('patch with only garbage') and a real change whose tree then differs."""
    corpus = fuzz_apply.build_corpus(tmp_path, random.Random(1), bases=1, seeds=1)
    oracle, base = corpus.oracle, corpus.bases[0][0]
    good = b"diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n+LINE 2\n line 3\n"
    assert oracle.judge(good, base) is None
    unchanged = fuzz_apply._git(oracle.git_dir.parent, "rev-parse", f"{base}^{{tree}}").stdout.decode().strip()
    monkeypatch.setattr(oracle, "ours", lambda patch, target: ("accepted", fuzz_apply.Verdict(True, unchanged, "clean")))
    assert oracle.judge(good, base).kind == "tree-differs"
    garbage = oracle.judge(good.replace(b"@@ -1,3 +1,3 @@", b"@@"), base)
    assert garbage.kind == "accept-refuse" and "garbage" in garbage.git
    assert oracle.minimize(garbage).patch.count(b"\n") <= good.count(b"\n")


PIECES = st.sampled_from([
    b"diff --git a/x b/x\n", b"--- a/x\n", b"+++ b/x\n", b"--- /dev/null\n", b"+++ /dev/null\n", b"@@ -1,2 +1,2 @@\n",
    b"@@ -0,0 +1 @@\n", b"@@\n", b"@@ -1 +1 @@", b" ctx\n", b"-old\n", b"+new\n", b"\\ No newline at end of file\n",
    b"new file mode 100644\n", b"deleted file mode 100644\n", b"old mode 100644\n", b"new mode 100755\n",
    b"rename from x\n", b"rename to y\n", b"copy from x\n", b"copy to \"y\\001\"\n", b"index 1234567..89abcde 100644\n",
    b"GIT binary patch\n", b"literal 5\n", b"delta 3\n", b"zcmV\n", b"\n", b"\r\n", b"From x Mon Sep 17 00:00:00 2001\n",
    b"Subject: =?utf-8?q?x?=\n", b"---\n", b"-- \n", b"diff --git \"a/q\\\" b/q\n", b"\xff\xfe\n", b"\0",
])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=400), st.lists(st.one_of(PIECES, st.binary(max_size=8)), max_size=30).map(b"".join)))
def test_parse_patch_raises_only_patch_error(data):
    try:
        parse_patch(data, series="s", name="p.patch", where="p.patch")
    except PatchError:
        pass
