#!/usr/bin/env bash
# Cross-node checks, run on n1 (web) after `vagrant up`: web reaches socat on the last
# node through the transparent path; a deny intention stops it; allowing restores.
set -euo pipefail
CG2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
SOCAT_IP=${SOCAT_IP:-198.18.0.13}
as_web() { sh -c "echo \$\$ > $CG2/app/web/cgroup.procs && exec $*"; }

echo "hello" | as_web nc -N -w 3 "$SOCAT_IP" 8181 | grep -q hello && echo "ok: web reaches socat"
connect-agent intention create -deny -replace web socat
if echo "hello" | as_web nc -N -w 3 "$SOCAT_IP" 8181 | grep -q hello; then
  echo "not ok: deny intention not enforced" >&2; exit 1
fi
echo "ok: deny intention enforced"
connect-agent intention create -allow -replace web socat
echo "hello" | as_web nc -N -w 3 "$SOCAT_IP" 8181 | grep -q hello && echo "ok: allowed again"
