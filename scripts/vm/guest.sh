#!/usr/bin/env bash
# Runs inside the virtme-ng guest (see run-tests.sh): the kernel-path tests, results to $1.
# The host root is read-only here, so no bytecode or pytest cache is written.
set -uo pipefail
run=$1
shift
export SMIG_IN_VM=1 SMIG_VM_RUN_DIR="$PWD/$run" PYTHONDONTWRITEBYTECODE=1
# TCG emulation is several times slower than the host: stretch the lab's waits.
export SMIG_TIMEOUT_SCALE=${SMIG_TIMEOUT_SCALE:-4}
echo "guest: $(uname -r), $(nproc) CPUs"
# virtme-ng's minimal init loads no modules: the TUN device (userspace ESP backend) and what
# Mininet needs (veth, the OVS kernel datapath, netem links) are loaded up front; XFRM/ESP and
# nftables load on demand.
for mod in tun veth openvswitch sch_netem sch_htb; do
  modprobe "$mod" || echo "guest: modprobe $mod failed" >&2
done

# Open vSwitch for the lab tests, this guest's own: /run is a private tmpfs here and /etc, /var
# private overlays, so nothing reaches the host's OVS. A fresh database on /run (not the host's
# conf.db copy, which may list the host's bridges); logs go to the run folder.
ovs_dir=/run/openvswitch
mkdir -p "$ovs_dir" "$run/ovs"
if OVS_LOGDIR="$PWD/$run/ovs" /usr/share/openvswitch/scripts/ovs-ctl start \
     --system-id=random --db-file="$ovs_dir/conf.db" --delete-bridges --no-record-hostname \
     >"$run/ovs/start.log" 2>&1 \
   && ovs-vsctl --timeout=20 show >/dev/null 2>&1; then
  echo "guest: Open vSwitch started ($(ovs-vsctl --version | head -n 1))"
else
  echo "guest: Open vSwitch did not start: see $run/ovs/start.log (lab tests will fail)" >&2
fi

if [ "${SMIG_VM_MODE:-test}" = experiment ]; then
  # `make vm-experiment`: the experiment itself; results go to captures/ (a --rwdir), its
  # control sockets to /tmp (Unix sockets cannot live on the shared folder).
  SMIG_EMULATION=TCG SMIG_CTL_DIR=/tmp/smig-ctl .venv/bin/python -m experiments.experiment \
    --trials "${SMIG_VM_TRIALS:-1}" --name vm-experiment >"$run/experiment.log" 2>&1
  rc=$?
  tail -n 60 "$run/experiment.log" >"$run/pytest.log"
else
  .venv/bin/python -m pytest -m vm tests/vm -p no:cacheprovider -v \
    --junitxml="$run/junit.xml" "$@" >"$run/pytest.log" 2>&1
  rc=$?
fi
echo "$rc" >"$run/rc"
exit "$rc"
