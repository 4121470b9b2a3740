# Sourced by .ci/run: what the rebase/export/bisect tests need on a fresh Debian 12 machine.
# They build their own repositories with git (>= 2.38); nothing else (no Docker, no network).
# Idempotent and ~0 s when git is already there (~10 s to install it otherwise).
if ! command -v git >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends git >/dev/null
fi
git --version
