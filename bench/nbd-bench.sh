#!/bin/bash
# Full read of a 4 GiB qcow2 through qemu-nbd: ferry vs nbdcopy vs qemu-img convert.
# Results and method: bench/NBD.md.
#
# Usage: bench/nbd-bench.sh [DIR [FERRY]]          (run as: nice -n 10 bench/nbd-bench.sh)
#   DIR    (or env D)     work directory holding big.qcow2; default ${TMPDIR:-/tmp}/nbdbench
#   FERRY  (or env FERRY) the ferry binary; default target/release/ferry of this repository
#   env COMPRESS=none     series 2 of bench/NBD.md: ferry --compress none against nbdcopy
#                         (default: series 1, ferry --compress auto, nbdcopy, qemu-img)
#
# Prepare DIR/big.qcow2 once (bench/NBD.md, "Image"; gen.py is listed there):
#   mkdir -p "$D" && cd "$D"
#   python3 gen.py                                   # writes unit.raw, 256 MiB
#   for i in $(seq 16); do cat unit.raw; done > big.raw
#   qemu-img convert -f raw -O qcow2 big.raw big.qcow2
#   rm unit.raw big.raw                              # only big.qcow2 is read
# and build ferry: cargo build --release -p ferry (from the repository root).
# Needs qemu-nbd and qemu-img (qemu-utils), nbdcopy (libnbd-bin), bc and /usr/bin/time;
# about 9 GiB free in DIR (the 4 GiB qcow2 and one 4 GiB output at a time).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${1:-${D:-${TMPDIR:-/tmp}/nbdbench}}
FERRY=${2:-${FERRY:-$REPO/target/release/ferry}}
COMPRESS=${COMPRESS:-}
for tool in qemu-nbd qemu-img nbdcopy bc /usr/bin/time; do
  command -v "$tool" > /dev/null || { echo "nbd-bench.sh: $tool not found" >&2; exit 2; }
done
[ -x "$FERRY" ] || { echo "nbd-bench.sh: no ferry binary at $FERRY (cargo build --release -p ferry, or set FERRY)" >&2; exit 2; }
[ -f "$D/big.qcow2" ] || { echo "nbd-bench.sh: no $D/big.qcow2 (see the top of this script)" >&2; exit 2; }
case "$COMPRESS" in ""|none) ;; *) echo "nbd-bench.sh: COMPRESS must be empty or none" >&2; exit 2;; esac
S=$D/s
rm -f "$S"
qemu-nbd -r -t -e 4 -f qcow2 --socket="$S" "$D/big.qcow2" & QPID=$!
trap 'kill $QPID; wait $QPID 2>/dev/null' EXIT
while [ ! -S "$S" ]; do sleep 0.1; done
URI="nbd+unix:///?socket=$S"
cat "$D/big.qcow2" > /dev/null   # warm the page cache for every tool alike
run() { # name cmd...
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$D/time.txt" "${@:2}" > "$D/out-$1.txt" 2>&1
  t1=$(date +%s.%N)
  echo "$1 $(echo "$t1 - $t0" | bc) $(cat "$D/time.txt") load=$(cut -d' ' -f1 /proc/loadavg)"
}
for i in 1 2 3; do
  rm -rf "$D/ds" "$D/nbdcopy.raw" "$D/convert.raw"; sync
  if [ "$COMPRESS" = none ]; then
    run ferry-nocomp "$FERRY" replicate --json --replica vm --target "$D/ds" --compress none --source "d=$URI"
  else
    run ferry "$FERRY" replicate --json --replica vm --target "$D/ds" --source "d=$URI"
  fi
  rm -rf "$D/ds"; sync
  run nbdcopy nbdcopy "$URI" "$D/nbdcopy.raw"
  rm -f "$D/nbdcopy.raw"; sync
  if [ "$COMPRESS" != none ]; then
    run qemu-img qemu-img convert -f qcow2 -O raw "$D/big.qcow2" "$D/convert.raw"
    rm -f "$D/convert.raw"; sync
  fi
done
