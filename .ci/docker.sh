# Sourced by .ci/run: a real Docker Engine and a local base image, without any registry, made by
# `stackbuild setup` (the same command quickstart runs; idempotent, each step skipped when done).
# Env: STACKBUILD_BASE_IMAGE (default stackbuild/base:bookworm), STACKBUILD_DOCKERD_LOG.
# Its "left running" lines are kept in $SB_SETUP_OUT for the caller's final summary.
SB_SETUP_OUT="${SB_SETUP_OUT:-$(mktemp)}"
.venv/bin/stackbuild setup | tee "$SB_SETUP_OUT"
export STACKBUILD_BASE_IMAGE="${STACKBUILD_BASE_IMAGE:-stackbuild/base:bookworm}"
