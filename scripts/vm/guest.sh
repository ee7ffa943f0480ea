#!/usr/bin/env bash
# Runs inside the virtme-ng guest (see run-tests.sh): the kernel-path tests, results to $1.
# The host root is read-only here, so no bytecode or pytest cache is written.
set -uo pipefail
run=$1
shift
export SMIG_IN_VM=1 SMIG_VM_RUN_DIR="$PWD/$run" PYTHONDONTWRITEBYTECODE=1
echo "guest: $(uname -r), $(nproc) CPUs"
# virtme-ng's minimal init loads no modules: the TUN device the userspace backend needs only
# appears once its module is in (the rest, XFRM/ESP/veth/nftables, load on demand).
modprobe tun || echo "guest: modprobe tun failed" >&2
.venv/bin/python -m pytest -m vm tests/vm -p no:cacheprovider -v \
  --junitxml="$run/junit.xml" "$@" >"$run/pytest.log" 2>&1
rc=$?
echo "$rc" >"$run/rc"
exit "$rc"
