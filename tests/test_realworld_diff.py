"""Patches no one here wrote: diffs between consecutive PyPI source releases of real projects.

Each project's sdists become commits of one repository; the diff v(i)->v(i+1) is applied onto
v(i) (must be clean and give v(i+1) exactly) and onto its neighbours v(i-1) and v(i+1), where
offsets, three-way merges and conflicts happen. There stackbuild's verdict and tree must be
git's, judged by the fuzzer's oracle (bench/fuzz_apply.py): `git apply --cached`, `--3way`
where stackbuild merged, `-R` where it says already-applied. Sdists come through pip's own
index configuration and are cached outside the repository (STACKBUILD_TEST_DATA, else
~/.cache/stackbuild-tests), so only the first run downloads (~3 MB).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from builder.archives import _unpack, fetch_archive
from builder.config import Source
from builder.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fuzz_apply  # noqa: E402

SHARED = Path(os.environ.get("STACKBUILD_TEST_DATA") or Path.home() / ".cache" / "stackbuild-tests") / "realworld"

RELEASES = {  # small pure-Python projects, consecutive releases: 33 neighbouring pairs
    "six": ["1.12.0", "1.13.0", "1.14.0", "1.15.0", "1.16.0", "1.17.0"],
    "idna": ["3.2", "3.3", "3.4", "3.5", "3.6", "3.7", "3.8", "3.9", "3.10"],
    "iniconfig": ["1.0.0", "1.0.1", "1.1.0", "1.1.1", "2.0.0"],
    "pluggy": ["0.13.1", "1.0.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0"],
    "tomli": ["2.0.0", "2.0.1", "2.0.2", "2.1.0", "2.2.1"],
    "packaging": ["21.3", "22.0", "23.0", "23.1", "23.2", "24.0", "24.1", "24.2"],
}


def _sdist_tree(project: str, version: str, into: Path) -> Path:
    settings = Settings(cache_dir=SHARED, work_dir=into, dist_dir=into, results_dir=into)
    archive, _sha = fetch_archive(settings, Source(name=project, kind="pypi", pypi=f"{project}=={version}"))
    return _unpack(archive, into / f"{project}-{version}")


def _import(work: Path, tree: Path, version: str) -> str:
    for child in work.iterdir():
        if child.name != ".git":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for child in tree.iterdir():
        shutil.move(str(child), work / child.name)
    fuzz_apply._git(work, "add", "-A", "-f")
    fuzz_apply._git(work, "commit", "-q", "--allow-empty", "--no-verify", "-m", version)
    return fuzz_apply._git(work, "rev-parse", "HEAD").stdout.decode().strip()


@pytest.mark.realworld
@pytest.mark.parametrize("project", sorted(RELEASES))
def test_release_diffs_agree_with_git(project, tmp_path, monkeypatch):
    for key, value in fuzz_apply.ENV.items():
        monkeypatch.setenv(key, value)
    work = tmp_path / "repo"
    work.mkdir()
    fuzz_apply._git(work, "init", "-q", "-b", "main")
    commits = [_import(work, _sdist_tree(project, v, tmp_path / "unpacked"), v) for v in RELEASES[project]]
    oracle = fuzz_apply.Oracle(tmp_path)
    outcomes = []
    for i in range(len(commits) - 1):
        patch = fuzz_apply._git(work, "diff", "--binary", commits[i], commits[i + 1]).stdout
        state, ours = oracle.ours(patch, commits[i])
        expected = fuzz_apply._git(work, "rev-parse", f"{commits[i + 1]}^{{tree}}").stdout.decode().strip()
        assert (state, ours.tree) == ("accepted", expected), f"{project} {RELEASES[project][i]}->{RELEASES[project][i + 1]}: {ours.detail}"
        for j in (i - 1, i + 1):
            if 0 <= j < len(commits):
                found = oracle.judge(patch, commits[j])
                where = f"{project} {RELEASES[project][i]}->{RELEASES[project][i + 1]} onto {RELEASES[project][j]}"
                assert found is None, f"{where}: {found.kind}\nstackbuild: {found.ours}\ngit: {found.git}"
                outcomes.append(oracle.ours(patch, commits[j])[0])
    # Neighbours must exercise more than clean applies, or the comparison proves little.
    assert set(outcomes) - {"accepted"}, outcomes
