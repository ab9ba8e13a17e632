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
# service is disabled) and python3-venv. Then .venv with the project and its [test,gpl,cluster]
# extras.
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
    # Not on PATH: Debian keeps the server binaries in a versioned directory.
    [ -x /usr/lib/postgresql/15/bin/postgres ] && [ -x /usr/lib/postgresql/15/bin/initdb ] \
        || echo postgresql
    [ -e /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so ] || echo orthanc-postgresql
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || echo python3-venv
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

mapfile -t packages < <(missing_packages)
if [ "${#packages[@]}" -gt 0 ]; then
    echo "setup: installing ${packages[*]}"
    install_packages "${packages[@]}"
fi
disable_service orthanc
disable_service prometheus
disable_service postgresql

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
