#!/usr/bin/env bash
# Install what the tests need, only what is missing; safe to run again and again.
#
# As root, or as a user with sudo. Debian packages: orthanc (the real servers the tests run),
# dcmtk (storescp, the workstation), libgdcm-tools (gdcmconv, an independent decoder),
# docker-compose (validates deploy/docker-compose.yml; no docker engine needed), openssl
# (a certificate for the HTTPS test), chromium (the status page test renders the page in a real
# browser), systemd (systemd-analyze verifies the unit file), prometheus (its promtool checks
# deploy/monitoring; the server itself is never started), postgresql and orthanc-postgresql (the
# tests start their own PostgreSQL 15 as the shared index of an Orthanc cluster; the packaged
# service is disabled), orthanc-dicomweb (Orthanc's DICOMweb plugin: the STOW-RS, WADO-RS and
# QIDO-RS archive of the dicomweb target tests), grokj2k-tools (Grok's grk_compress and grk_decompress: signed HTJ2K
# encoded and decoded independently of the bridge's OpenJPEG, tests/test_htj2k.py), debootstrap
# and python3-venv. Then .venv with the project and its
# [test,gpl,cluster] extras.
#
# Also a Debian 13 (trixie) root holding its Orthanc 1.12, orthanc-postgresql and orthanc-dicomweb, built once with
# debootstrap into ORTHANC_NEXT_ROOT (default /var/cache/orthanc-bridge/trixie, outside the repo so
# that later runs and fresh clones reuse it): scripts/orthanc-next runs that Orthanc, and
# scripts/test.sh runs the real-server tests against it too. DEBIAN_MIRROR overrides the mirror,
# by default the one the host's apt uses (CI reaches only the package registries).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# `python3` from PATH, not /usr/bin/python3: on the developers' machines it is pyenv's 3.11,
# which has the wheels cached; Debian's python3 (3.11 on bookworm) works as well.
PYTHON=${PYTHON:-python3}
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

missing_packages() {
    [ -x /usr/sbin/Orthanc ] || echo orthanc
    command -v storescp >/dev/null || echo dcmtk
    command -v gdcmconv >/dev/null || echo libgdcm-tools
    command -v docker-compose >/dev/null || echo docker-compose
    command -v openssl >/dev/null || echo openssl
    command -v chromium >/dev/null || echo chromium
    command -v systemd-analyze >/dev/null || echo systemd
    command -v promtool >/dev/null || echo prometheus
    command -v grk_compress >/dev/null || echo grokj2k-tools
    # Not on PATH: Debian keeps the server binaries in a versioned directory.
    [ -x /usr/lib/postgresql/15/bin/postgres ] && [ -x /usr/lib/postgresql/15/bin/initdb ] \
        || echo postgresql
    [ -e /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so ] || echo orthanc-postgresql
    [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || echo orthanc-dicomweb
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || echo python3-venv
    command -v debootstrap >/dev/null || echo debootstrap
}

# Debian starts a service right after installing it; policy-rc.d forbids that meanwhile,
# so the packaged Orthanc never binds 8042 (nor Prometheus 9090) behind the tests' back.
install_packages() {
    local added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    local status=0
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || status=$?
    if [ "$status" -eq 0 ]; then
        # No recommends: docker-compose would pull in a whole docker engine.
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "$@" || status=$?
    fi
    if [ "$added_policy" -eq 1 ]; then
        "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
    fi
    return "$status"
}

# Stop and disable a packaged service ($1) in case it was started anyway (an earlier install, a
# policy-rc.d that allowed it) and so that it never starts at boot: the tests start their own.
disable_service() {
    local name=$1
    [ -e "/etc/init.d/$name" ] || [ -e "/lib/systemd/system/$name.service" ] || return 0
    if [ -d /run/systemd/system ]; then
        "${SUDO[@]}" systemctl disable --now "$name" >/dev/null 2>&1 || true
    else
        if [ -x "/etc/init.d/$name" ] && "${SUDO[@]}" "/etc/init.d/$name" status >/dev/null 2>&1; then
            "${SUDO[@]}" "/etc/init.d/$name" stop || true
        fi
        "${SUDO[@]}" update-rc.d "$name" disable >/dev/null 2>&1 || true
    fi
}

ORTHANC_NEXT_ROOT=${ORTHANC_NEXT_ROOT:-/var/cache/orthanc-bridge/trixie}
ORTHANC_NEXT_SUITE=trixie
ORTHANC_NEXT_PACKAGES=orthanc,orthanc-postgresql,orthanc-dicomweb
# What makes a finished root: a build without them is rebuilt (a root from before a package was
# added to the list above), never patched.
ORTHANC_NEXT_FILES=(usr/sbin/Orthanc usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so
    usr/share/orthanc/plugins/libOrthancDicomWeb.so)

orthanc_next_complete() {
    local file
    for file in "${ORTHANC_NEXT_FILES[@]}"; do
        [ -e "$ORTHANC_NEXT_ROOT/$file" ] || return 1
    done
}

# The Debian mirror of the host's apt (both sources.list formats), so that debootstrap works where
# only the package registries are reachable; deb.debian.org on a host that is not Debian.
host_debian_mirror() {
    local id codename mirror=""
    id=$(. /etc/os-release && echo "${ID:-}")
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    if [ "$id" = debian ] && [ -n "$codename" ]; then
        # One-line format: deb [options] URI suite components...
        mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v c="$codename" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == c) { print $i; exit }
            }')
        if [ -z "$mirror" ]; then
            # deb822 format: the first enabled stanza of Types deb whose Suites name the release.
            mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v c="$codename" '
                function flush() {
                    if (enabled && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " c " ")) {
                        split(uris, u, " "); print u[1]; found = 1
                    }
                    types = uris = suites = ""; enabled = 1
                }
                BEGIN { enabled = 1 }
                /^[ \t]*$/ { flush(); if (found) exit; next }
                /^#/ { next }
                /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
                /^URIs:/ { sub(/^URIs:[ \t]*/, ""); uris = $0 }
                /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
                /^Enabled:[ \t]*[Nn]o/ { enabled = 0 }
                END { if (!found) flush() }')
        fi
    fi
    echo "${mirror:-http://deb.debian.org/debian}"
}

# debootstrap into a temporary directory next to the root, renamed once complete: an interrupted
# build is never taken for a finished one. Each stage runs in a private mount namespace, so the
# /proc and /sys that debootstrap mounts inside vanish with it and never pin the directory.
build_orthanc_next_root() {
    local parent mirror build old
    parent=$(dirname "$ORTHANC_NEXT_ROOT")
    mirror=${DEBIAN_MIRROR:-$(host_debian_mirror)}
    "${SUDO[@]}" mkdir -p "$parent"
    # Leftovers of interrupted builds (no mount can remain in them, see above).
    "${SUDO[@]}" find "$parent" -mindepth 1 -maxdepth 1 -name "$(basename "$ORTHANC_NEXT_ROOT").build-*" \
        -exec rm -rf --one-file-system {} +
    build=$("${SUDO[@]}" mktemp -d "$ORTHANC_NEXT_ROOT.build-XXXXXX")
    # mktemp's 0700 would keep everyone but root out of the finished root's / (a user running
    # scripts/orthanc-next without root, through a user namespace).
    "${SUDO[@]}" chmod 755 "$build"
    echo "setup: building a Debian $ORTHANC_NEXT_SUITE root with $ORTHANC_NEXT_PACKAGES in $ORTHANC_NEXT_ROOT from $mirror"
    "${SUDO[@]}" unshare --mount debootstrap --foreign --variant=minbase \
        --include="$ORTHANC_NEXT_PACKAGES" "$ORTHANC_NEXT_SUITE" "$build" "$mirror" >/dev/null
    # The root's packaged Orthanc (and PostgreSQL client bits) must never start a service: the
    # second stage configures the packages under this policy, kept for any later apt run there.
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$build/usr/sbin/policy-rc.d" >/dev/null
    "${SUDO[@]}" chmod 755 "$build/usr/sbin/policy-rc.d"
    "${SUDO[@]}" unshare --mount chroot "$build" /debootstrap/debootstrap --second-stage >/dev/null
    # Only what Orthanc needs is kept: the downloaded .deb files go.
    "${SUDO[@]}" find "$build/var/cache/apt/archives" -name '*.deb' -delete
    local file
    for file in "${ORTHANC_NEXT_FILES[@]}"; do
        [ -e "$build/$file" ] || { echo "setup: $file missing from the $ORTHANC_NEXT_SUITE root" >&2; return 1; }
    done
    if [ -e "$ORTHANC_NEXT_ROOT" ]; then
        old=$("${SUDO[@]}" mktemp -d "$ORTHANC_NEXT_ROOT.build-XXXXXX")
        "${SUDO[@]}" mv -T "$ORTHANC_NEXT_ROOT" "$old/root"
        "${SUDO[@]}" mv -T "$build" "$ORTHANC_NEXT_ROOT"
        "${SUDO[@]}" rm -rf --one-file-system "$old"
    else
        "${SUDO[@]}" mv -T "$build" "$ORTHANC_NEXT_ROOT"
    fi
    echo "setup: $("${SUDO[@]}" chroot "$ORTHANC_NEXT_ROOT" /usr/sbin/Orthanc --version | head -n 1) in $ORTHANC_NEXT_ROOT"
}

mapfile -t packages < <(missing_packages)
if [ "${#packages[@]}" -gt 0 ]; then
    echo "setup: installing ${packages[*]}"
    install_packages "${packages[@]}"
fi
disable_service orthanc
disable_service prometheus
disable_service postgresql
orthanc_next_complete || build_orthanc_next_root

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed: a stamp holds the hash it was installed from.
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "setup: installing the project into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test,gpl,cluster]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
echo "setup: ready"
