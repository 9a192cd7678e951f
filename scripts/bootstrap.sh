#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) for netloom: Debian packages, a running dockerd,
# the project venv and the lab node image. Idempotent: every step checks first and does
# only what is missing, so re-running it is cheap (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts dockerd)"

# What the controller and the tests use: the engine and image build (docker.io, debootstrap),
# kernel networking tools, ssh to the lab nodes, the venv, and the services the module
# tests run in network namespaces; systemd for systemd-analyze (the unit templates' check).
# graphviz (`dot`) draws playbooks/topology.yml's picture, with a font for its PNG.
# QEMU, qemu-img and mkfs.ext4 -d for the qemu_vm tests and their guest disk (pycdlib: pip).
packages=(docker.io debootstrap iproute2 iptables busybox-static openssh-client python3-venv
          wireguard-tools wireguard-go haproxy nginx iperf3 curl iputils-ping procps openssl systemd
          graphviz fonts-dejavu-core qemu-system-x86 qemu-utils e2fsprogs)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done

mkdir -p /var/log/netloom
apt_log=/var/log/netloom/bootstrap-apt.log
apt_get() {  # apt-get, its chatter to $apt_log (its end is shown when it fails)
  if ! DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 \
      apt-get -o DPkg::Lock::Timeout=300 -q "$@" >>"$apt_log" 2>&1; then
    tail -n 15 "$apt_log" >&2
    return 1
  fi
}
apt_install() { apt_get install -y --no-install-recommends "$@"; }

if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  # Installing must not start haproxy, nginx or dockerd as services on this machine (the
  # tests run their own instances; dockerd is started below): a policy-rc.d that denies
  # every start, unless the machine already has one of its own.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'if [ $own_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  fi
  # apt-get update only when needed: no package lists yet, or a package is unknown to them
  # (or the lists are stale and a download fails, retried once after an update).
  need_update=0
  compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || need_update=1
  for package in "${missing[@]}"; do
    apt-cache show "$package" >/dev/null 2>&1 || need_update=1
  done
  if [ $need_update = 1 ]; then
    say "apt-get update"
    apt_get update || die "apt-get update failed (log $apt_log)"
  fi
  if ! apt_install "${missing[@]}"; then
    say "install failed; refreshing the package lists and retrying once"
    apt_get update || die "apt-get update failed (log $apt_log)"
    apt_install "${missing[@]}" || die "apt-get install ${missing[*]} failed (log $apt_log)"
  fi
  if [ $own_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; own_policy=0; fi
else
  say "Debian packages: all ${#packages[@]} installed"
fi

# dockerd: Debian's 20.10. /usr/bin/docker is its client (a newer one may shadow it in
# /usr/local/bin). The lab's nodes run dockerd too, so "is one running" is asked of the
# host's socket, never of the process list.
docker_cli=/usr/bin/docker
if "$docker_cli" info >/dev/null 2>&1; then
  say "dockerd: running"
else
  if [ "$(ps -p 1 -o comm=)" = systemd ]; then
    say "dockerd: starting (systemctl)"
    systemctl start docker
  else
    log=/var/log/netloom/dockerd.log
    say "dockerd: starting in the background (no systemd here; log $log)"
    setsid /usr/sbin/dockerd >>"$log" 2>&1 < /dev/null &
  fi
  for _ in $(seq 1 60); do
    "$docker_cli" info >/dev/null 2>&1 && break
    sleep 1
  done
  "$docker_cli" info >/dev/null 2>&1 || die "dockerd did not answer within 60 s (see ${log:-journalctl -u docker})"
  say "dockerd: running"
fi

# The project venv, from Debian's python3 on a fresh machine; reinstalled only when
# requirements.txt changed (its hash is kept next to the venv).
venv=$repo/.venv
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  /usr/bin/python3 -m venv "$venv"
fi
stamp=$venv/.netloom-requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  say "pip install -r requirements.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$wanted" > "$stamp"
else
  say "venv: requirements.txt unchanged since the last install"
fi

# Wheels the runner_vms role copies to nodes that have no registry (qemu.qmp, not in Debian 12):
# into the controller's cache now, checked against their pinned hashes, so a converge (molecule
# vms) needs no PyPI. pip verifies a file already in the cache and downloads only what is missing.
wheels=${HOME:?}/.cache/netloom/wheels
say "node wheels into $wheels"
"$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --require-hashes --dest "$wheels" -r roles/runner_vms/files/node-wheels.txt

# The lab node image: built once per recipe (lab/image/), a few minutes the first time.
say "lab node image"
"$venv/bin/python" lab/netloom_lab.py image
# The test VM guest (qemu_vm): Debian with cloud-init and a kernel, once per recipe (lab/guest/),
# about 6.5 min the first time. scripts/site.sh's default cluster runs no VM and skips it
# (NETLOOM_BOOTSTRAP_GUEST=0); the vms scenario would build it itself when it is missing.
if [ "${NETLOOM_BOOTSTRAP_GUEST:-1}" = 1 ]; then
  say "VM test guest"
  "$venv/bin/python" lab/netloom_lab.py guest
fi
say "done"
