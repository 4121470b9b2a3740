"""The root stack.toml (the B70 lab's stacks) is valid without fetching anything.

Fetching its sources and patches for real needs GitHub and the lab's repository; that is not
possible here and is not pretended: these tests check the schema, the pins, every URL and hash,
and that the stacks resolve to the series and sources the lab runs.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from builder.config import SHA256_RE, SHA_RE, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_lab_stacks_resolve():
    config = load_config(ROOT / "stack.toml")
    assert set(config.stacks) >= {"baseline", "turboquant", "cpu-kv", "research"}
    # The pins' form, not their values: a rebase of the root stack moves them.
    pins = {n: s.commit for n, s in config.sources.items()}
    assert set(pins) == {"vllm", "llm-scaler", "vllm-xpu-kernels"}
    assert all(SHA_RE.match(pin or "") for pin in pins.values()), pins
    assert config.sources["vllm-xpu-kernels"].submodules
    layers = {name: [s.name for s in config.stack(name).series] for name in config.stacks}
    assert layers["baseline"] == ["promoted-vllm", "promoted-esimd"]
    assert layers["turboquant"] == ["promoted-vllm", "promoted-esimd", "turboquant"]
    assert layers["cpu-kv"] == ["promoted-vllm", "promoted-esimd", "cpu-kv"]
    assert layers["research"] == ["promoted-vllm", "promoted-esimd", "cpu-kv", "turboquant"]
    for name in config.stacks:
        stack = config.stack(name)
        # The CPU variants (tests/test_variants.py) build vLLM alone; the XPU stacks build all three.
        expected = {"vllm"} if stack.variant else {"vllm", "llm-scaler", "vllm-xpu-kernels"}
        assert {s.name for s in stack.sources} == expected
    assert config.series["promoted-esimd"].directory == "vllm/custom-esimd-kernels-vllm"


def test_every_remote_patch_is_pinned_and_well_formed():
    config = load_config(ROOT / "stack.toml")
    remote = [(s.name, ref) for s in config.series.values() for ref in (s.inline or ())]
    assert len(remote) == 4
    for _series, ref in remote:
        url = urllib.parse.urlparse(ref.url)
        assert url.scheme == "https" and url.netloc == "raw.githubusercontent.com"
        owner, repo, commit, *path = url.path.strip("/").split("/")
        assert (owner, repo) == ("steveseguin", "b70-optimization-lab")
        assert SHA_RE.match(commit) and path and path[-1] == ref.name
        assert SHA256_RE.match(ref.sha256)
        assert re.search(r"\.patch(\.gz\.b64)?$", ref.name)
    for source in config.sources.values():
        assert SHA_RE.match(source.commit or "") and source.url.startswith("https://github.com/")
