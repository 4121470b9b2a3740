"""The skip guard in conftest.py: with a STACKBUILD_REQUIRE_* variable set, any skip fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REQUIRE_VARS

CONFTEST = Path(__file__).with_name("conftest.py")

SUITE = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("no engine here")
"""


@pytest.fixture(autouse=True)
def nothing_required(monkeypatch):
    """CI runs this file with both variables set; each test here sets what it is about."""
    for var in REQUIRE_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_suite=SUITE)
    return pytester


@pytest.mark.parametrize("var", ["STACKBUILD_REQUIRE_DOCKER", "STACKBUILD_REQUIRE_VLLM"])
def test_a_skip_fails_the_run_when_either_variable_is_set(suite, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_suite.py::test_skips: no engine here",
                                 f"1 skipped while {var} is set: failing the run"])


@pytest.mark.parametrize("value", ["", "0"])
def test_skips_pass_when_nothing_is_required(suite, monkeypatch, value):
    for var in REQUIRE_VARS:
        monkeypatch.setenv(var, value)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=1)
    assert "skips refused" not in result.stdout.str()


def test_a_skipped_module_counts_too(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_gone="import pytest\npytest.skip('no vllm', allow_module_level=True)\n")
    for var in REQUIRE_VARS:
        monkeypatch.setenv(var, "yes")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*test_gone.py: no vllm",
                                 "1 skipped while STACKBUILD_REQUIRE_DOCKER and STACKBUILD_REQUIRE_VLLM are set: failing the run"])


def test_unavailable_fails_instead_of_skipping_when_required(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_tier="from conftest import unavailable\n\n"
                                  "def test_tier():\n    unavailable('STACKBUILD_REQUIRE_DOCKER', 'no engine')\n")
    monkeypatch.setenv("STACKBUILD_REQUIRE_DOCKER", "1")
    failed = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*STACKBUILD_REQUIRE_DOCKER is set but no engine*"])
    monkeypatch.delenv("STACKBUILD_REQUIRE_DOCKER")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(skipped=1)
