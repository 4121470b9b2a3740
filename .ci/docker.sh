# Sourced by .ci/run: a real Docker Engine and a local base image, without any registry.
# Idempotent: each step is skipped when its result is already there.
# Env: STACKBUILD_BASE_IMAGE (default stackbuild/base:bookworm), STACKBUILD_DOCKERD_LOG.

_sb_docker_setup() {
    local image="${STACKBUILD_BASE_IMAGE:-stackbuild/base:bookworm}"
    local log="${STACKBUILD_DOCKERD_LOG:-/var/log/stackbuild-dockerd.log}"
    local started

    # Only what is missing: a host with Docker CE already has an engine that docker.io would fight.
    local wanted=()
    command -v dockerd >/dev/null 2>&1 || wanted+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || wanted+=(debootstrap)
    if [ ${#wanted[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
    fi

    # Debian's docker.io client (/usr/bin/docker) works with the legacy builder; a newer client
    # earlier on PATH may want a buildx plugin Debian does not ship, so call this one by path.
    if ! /usr/bin/docker info >/dev/null 2>&1; then
        nohup dockerd >"$log" 2>&1 </dev/null &
        started=$(date +%s)
        until /usr/bin/docker info >/dev/null 2>&1; do
            if [ $(( $(date +%s) - started )) -gt 60 ]; then
                echo "dockerd did not answer within 60 s; see $log" >&2
                tail -n 20 "$log" >&2
                return 1
            fi
            sleep 0.5
        done
    fi

    if ! /usr/bin/docker image inspect "$image" >/dev/null 2>&1; then
        local mirror suite rootfs
        suite="${image##*:}"
        # The mirror apt already uses: whatever this host can reach.
        mirror=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
                 | awk '{print $2}' | grep -E '/debian/?$' | head -n 1)
        mirror="${mirror:-http://deb.debian.org/debian}"
        rootfs=$(mktemp -d)
        debootstrap --variant=minbase \
            --include=ca-certificates,python3,python3-pip,python3-venv,python3-dev,gcc,libc6-dev \
            "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
            || { echo "debootstrap failed; see $rootfs.log" >&2; tail -n 5 "$rootfs.log" >&2; rm -rf "$rootfs"; return 1; }
        rm -f "$rootfs.log"
        # Extra CAs of this host (an intercepting proxy's) go into the image's trust store.
        if [ -d /usr/local/share/ca-certificates ]; then
            cp -r /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
            chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || true
        fi
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
        rm -rf "$rootfs/var/cache/apt/archives/"*.deb
        tar -C "$rootfs" -c . | /usr/bin/docker import -c 'CMD ["/bin/bash"]' - "$image" >/dev/null
        rm -rf "$rootfs"
    fi
    export STACKBUILD_BASE_IMAGE="$image"
}

_sb_docker_setup
