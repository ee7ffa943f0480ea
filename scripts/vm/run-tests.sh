#!/usr/bin/env bash
# `make test-kernel`: boot Debian's distribution kernel (linux-image-amd64) under QEMU/TCG with
# virtme-ng and run the kernel-path tests (`pytest -m vm tests/vm`) inside; exit with pytest's
# code. The guest sees the host root read-only (never `--rw`) and writes only to the run folder
# under .vm/ (passed with --rwdir). Extra arguments go to pytest (e.g. -k interop).
# Env: SMIG_VM_TIMEOUT (s, default 900), SMIG_VM_MEMORY (default 2G), SMIG_VM_KERNEL (a vmlinuz).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here"

kernel=${SMIG_VM_KERNEL:-$(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$kernel" ] || [ ! -r "$kernel" ]; then
  echo "smig-lab: no distribution kernel in /boot: run 'make setup-vm' (linux-image-amd64)" >&2
  exit 2
fi
for tool in qemu-system-x86_64 busybox; do
  command -v "$tool" >/dev/null || { echo "smig-lab: $tool missing: run 'make setup-vm'" >&2; exit 2; }
done
[ -x .venv/bin/vng ] || { echo "smig-lab: .venv/bin/vng missing: run 'make setup-vm'" >&2; exit 2; }

run=.vm/run-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$run"
# keep the last few runs only
ls -1d .vm/run-* 2>/dev/null | sort | head -n -5 | xargs -r rm -rf --
echo "smig-lab: booting $(basename "$kernel") under QEMU/TCG (virtme-ng); output in $run"
start=$(date +%s)
# /dev/kvm here is PVM and cannot boot a stock kernel: always TCG (DESIGN §4).
# vng finds virtme-run on PATH; the guest gets the project's venv the same way.
set +e
PATH="$here/.venv/bin:$PATH" timeout --kill-after=10 "${SMIG_VM_TIMEOUT:-900}" \
  vng --run "$kernel" --disable-kvm --cpus 2 --memory "${SMIG_VM_MEMORY:-2G}" \
      --rwdir "$here/$run" $([ "${SMIG_VM_MODE:-test}" = experiment ] && \
        mkdir -p "$here/captures" && echo --rwdir "$here/captures") --cwd "$here" \
      --exec "env SMIG_VM_MODE=${SMIG_VM_MODE:-test} SMIG_VM_TRIALS=${SMIG_VM_TRIALS:-1} bash scripts/vm/guest.sh $run $*" \
      </dev/null >"$run/console.log" 2>&1
vng_rc=$?
set -e
end=$(date +%s)

if [ "${SMIG_VM_MODE:-test}" = experiment ] && [ -f "$run/pytest.log" ]; then
  cat "$run/pytest.log"
elif [ -f "$run/pytest.log" ]; then
  # pytest's closing lines (failures, summary) for the caller; the full log stays in $run.
  sed -n '/short test summary info\|=\{5,\} .*\(passed\|failed\|error\|skipped\|no tests ran\)/,$p' \
    "$run/pytest.log" | tail -n 40
fi
if [ ! -f "$run/rc" ]; then
  echo "smig-lab: the VM did not finish the tests (vng exit $vng_rc after $((end - start)) s);" \
       "console log: $run/console.log" >&2
  tail -n 20 "$run/console.log" >&2
  exit 1
fi
rc=$(cat "$run/rc")
echo "smig-lab: kernel VM run took $((end - start)) s (boot + tests); pytest exit $rc"
exit "$rc"
