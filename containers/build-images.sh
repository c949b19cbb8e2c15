#!/usr/bin/env bash
# Build every image of the container tier on a machine with no container registry.
#
#   containers/build-images.sh            # idempotent: skips images whose inputs are unchanged
#
# 1. plt-debian:bookworm  a Debian root filesystem made with debootstrap from Debian's own
#                         packages and loaded with `docker import` (no registry, no pull);
# 2. plt-postgres:15      Debian's PostgreSQL 15 on it, honouring the official image's
#                         POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB;
# 3. plt-node:local       the node on it, installed from wheels built here on the host
#                         (the image build reaches no package index);
# 4. plt-balancer:local   HAProxy from Debian's packages, in front of a province's node
#                         replicas (containers/balancer).
#
# Each image carries a label `plt.inputs` with a digest of what it was built from; an image
# whose label matches is kept. Needs root (debootstrap), docker, and Debian's mirror.
# Settings (environment): PLTC_DEBIAN_MIRROR, PLTC_DEBIAN_SUITE, PLTC_BASE_IMAGE, PLTC_PG_IMAGE,
# PLTC_NODE_IMAGE, PLTC_BALANCER_IMAGE, PLTC_PYTHON (the host Python that builds the wheels; default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

MIRROR=${PLTC_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${PLTC_DEBIAN_SUITE:-bookworm}
BASE_IMAGE=${PLTC_BASE_IMAGE:-plt-debian:bookworm}
PG_IMAGE=${PLTC_PG_IMAGE:-plt-postgres:15}
NODE_IMAGE=${PLTC_NODE_IMAGE:-plt-node:local}
BALANCER_IMAGE=${PLTC_BALANCER_IMAGE:-plt-balancer:local}
PYTHON=${PLTC_PYTHON:-.venv/bin/python}
CACHE=data/containers
PACKAGES=python3,python3-venv,ca-certificates,tzdata,procps
# Change when the recipe below changes in a way the inputs do not show.
RECIPE=1

log() { printf '[build-images] %s\n' "$*" >&2; }
digest() { sha256sum | cut -c1-16; }
label_of() { docker image inspect --format '{{ index .Config.Labels "plt.inputs" }}' "$1" 2>/dev/null || true; }

mkdir -p "$CACHE"

# --- 1. the Debian base ---------------------------------------------------------------------
base_inputs=$(printf '%s\n' "$RECIPE" "$MIRROR" "$SUITE" "$PACKAGES" | digest)
if [ "$(label_of "$BASE_IMAGE")" = "$base_inputs" ]; then
    log "$BASE_IMAGE is up to date ($base_inputs)"
else
    command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
    rootfs="$CACHE/rootfs-$base_inputs"
    rm -rf "$rootfs" "$rootfs.partial"
    log "debootstrap $SUITE from $MIRROR into $rootfs (about a minute)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs.partial" "$MIRROR" \
        > "$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    mv "$rootfs.partial" "$rootfs"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "docker import $BASE_IMAGE"
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL plt.inputs=$base_inputs" \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi
base_id=$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE")

# --- 2. PostgreSQL --------------------------------------------------------------------------
pg_inputs=$( (echo "$RECIPE $base_id"; cat containers/postgres/*) | digest)
if [ "$(label_of "$PG_IMAGE")" = "$pg_inputs" ]; then
    log "$PG_IMAGE is up to date ($pg_inputs)"
else
    log "docker build $PG_IMAGE (apt-get over the host's network)"
    docker build --quiet --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --label "plt.inputs=$pg_inputs" -t "$PG_IMAGE" containers/postgres >/dev/null
fi

# --- 3. the balancer ------------------------------------------------------------------------
balancer_inputs=$( (echo "$RECIPE $base_id"; cat containers/balancer/*) | digest)
if [ "$(label_of "$BALANCER_IMAGE")" = "$balancer_inputs" ]; then
    log "$BALANCER_IMAGE is up to date ($balancer_inputs)"
else
    log "docker build $BALANCER_IMAGE (apt-get over the host's network)"
    docker build --quiet --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --label "plt.inputs=$balancer_inputs" -t "$BALANCER_IMAGE" containers/balancer >/dev/null
fi

# --- 4. the node ----------------------------------------------------------------------------
inputs=(pyproject.toml wallet protocol nodes migrations containers/node)
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    sources=$(git ls-files -co --exclude-standard "${inputs[@]}" | LC_ALL=C sort)
else  # not a git checkout (an unpacked archive): every file but caches
    sources=$(find "${inputs[@]}" -type f -not -path '*/__pycache__/*' | LC_ALL=C sort)
fi
node_inputs=$( (echo "$RECIPE $base_id"; for f in $sources; do [ -f "$f" ] && { echo "$f"; cat "$f"; }; done) | digest)
if [ "$(label_of "$NODE_IMAGE")" = "$node_inputs" ]; then
    log "$NODE_IMAGE is up to date ($node_inputs)"
else
    want=$(docker run --rm "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$want" != "$have" ]; then
        log "the image has Python $want but $PYTHON is $have: wheels must match (set PLTC_PYTHON)"
        exit 1
    fi
    context="$CACHE/node-context"
    rm -rf "$context"
    mkdir -p "$context/wheels"
    log "building wheels with $PYTHON (the project and its dependencies)"
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$context/wheels" . 2> >(grep -v '^WARNING: Location' >&2)
    rm -rf build
    cp containers/node/* "$context/"
    log "docker build $NODE_IMAGE"
    docker build --quiet --network none --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --label "plt.inputs=$node_inputs" -t "$NODE_IMAGE" "$context" >/dev/null
    rm -rf "$context"
fi
log "images ready: $BASE_IMAGE $PG_IMAGE $BALANCER_IMAGE $NODE_IMAGE"
