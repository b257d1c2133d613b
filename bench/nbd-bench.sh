#!/bin/bash
# Full read of a 4 GiB qcow2 through qemu-nbd: ferry vs nbdcopy vs qemu-img convert.
set -e
D=/tmp/nbdbench
FERRY=/work/wt-nbd2/target/release/ferry
S=$D/s
rm -f $S
qemu-nbd -r -t -e 4 -f qcow2 --socket=$S $D/big.qcow2 & QPID=$!
trap 'kill $QPID; wait $QPID 2>/dev/null' EXIT
while [ ! -S $S ]; do sleep 0.1; done
URI="nbd+unix:///?socket=$S"
cat $D/big.qcow2 > /dev/null   # warm the page cache for every tool alike
run() { # name cmd...
  local t0=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o $D/time.txt "${@:2}" > $D/out-$1.txt 2>&1
  local t1=$(date +%s.%N)
  echo "$1 $(echo "$t1 - $t0" | bc) $(cat $D/time.txt) load=$(cut -d' ' -f1 /proc/loadavg)"
}
for i in 1 2 3; do
  rm -rf $D/ds $D/nbdcopy.raw $D/convert.raw; sync
  run ferry $FERRY replicate --json --replica vm --target $D/ds --source d=$URI
  rm -rf $D/ds; sync
  run nbdcopy nbdcopy "$URI" $D/nbdcopy.raw
  rm -f $D/nbdcopy.raw; sync
  run qemu-img qemu-img convert -f qcow2 -O raw $D/big.qcow2 $D/convert.raw
  rm -f $D/convert.raw; sync
done
