#!/usr/bin/env bash
# A throwaway single-node Ceph cluster serving S3 through radosgw, for tests and benchmarks.
#
# Usage: scripts/ceph-s3.sh start DIR PORT [MONPORT]   (MONPORT defaults to PORT+1)
#        scripts/ceph-s3.sh stop DIR
#
# start: creates DIR (wiped first), runs 1 mon + 1 memstore OSD + radosgw on 127.0.0.1:PORT, creates an
# S3 user, waits until a signed request works, then prints `READY http://127.0.0.1:PORT` and writes
# DIR/s3.env (S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY). Daemons keep running after the script exits;
# their PIDs are in DIR/{mon,osd,rgw}.pid and their logs in DIR/log/. On failure it stops what it started,
# prints the tail of the logs and exits 1.
# stop: TERM to each PID (KILL after 10 s), waits for them to exit. Safe to run twice.
#
# Ceph packages: radosgw ceph-mon ceph-osd (Debian; .ci/apt-packages.txt). Every `ms * mode` option is
# `crc`: with cephx off, the default `secure`-capable modes make the mon client hang on auth for 300 s.
# Keys: CEPH_S3_ACCESS_KEY / CEPH_S3_SECRET_KEY (defaults below) — test-only credentials.
# Capacity: the OSD keeps objects in RAM, CEPH_S3_MEMSTORE_BYTES (default 2 GiB). When it is full,
# radosgw does not fail writes, it blocks them: delete what a benchmark no longer needs.
set -euo pipefail

usage() { echo "usage: $0 start DIR PORT [MONPORT] | stop DIR" >&2; exit 64; }
[ $# -ge 2 ] || usage
cmd=$1
D=$2

stop_cluster() {
  local f pid i
  for f in rgw osd mon; do
    [ -f "$D/$f.pid" ] || continue
    pid=$(cat "$D/$f.pid")
    kill -TERM "$pid" 2>/dev/null || true
  done
  for f in rgw osd mon; do
    [ -f "$D/$f.pid" ] || continue
    pid=$(cat "$D/$f.pid")
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$D/$f.pid"
  done
}

if [ "$cmd" = stop ]; then
  [ -d "$D" ] && stop_cluster
  exit 0
fi
[ "$cmd" = start ] && [ $# -ge 3 ] || usage

PORT=$3
MONPORT=${4:-$((PORT + 1))}
ACCESS_KEY=${CEPH_S3_ACCESS_KEY:-CIACCESSKEY}
SECRET_KEY=${CEPH_S3_SECRET_KEY:-CISECRETKEY123}
for bin in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph python3; do
  command -v "$bin" >/dev/null || { echo "missing $bin (apt-get install radosgw ceph-mon ceph-osd)" >&2; exit 69; }
done

fail() {
  echo "ceph-s3: $*" >&2
  for f in "$D"/log/*; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  stop_cluster
  exit 1
}

[ -d "$D" ] && stop_cluster
rm -rf "$D"
mkdir -p "$D/mon" "$D/osd0" "$D/log"
FSID=$(python3 -c "import uuid; print(uuid.uuid4())")
cat >"$D/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MONPORT
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms mon service mode = crc
ms mon cluster mode = crc
ms client mode = crc
ms service mode = crc
ms cluster mode = crc
public addr = 127.0.0.1
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd pool default pg autoscale mode = off
osd objectstore = memstore
memstore device bytes = ${CEPH_S3_MEMSTORE_BYTES:-2147483648}
osd crush update on start = false
run dir = $D
log file = $D/log/\$name.log
admin socket = $D/\$name.asok
mon data avail warn = 1
mon data avail crit = 0
[mon.a]
mon data = $D/mon
[osd.0]
osd data = $D/osd0
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$PORT
# free deleted objects' data within seconds, not hours (the memstore OSD holds it in RAM)
rgw gc obj min wait = 5
rgw gc processor period = 5
rgw gc processor max time = 5
CONF
C=(-c "$D/ceph.conf")

# Daemons run in the foreground (-f) in the background of this shell, detached from our stdout/stderr
# so a caller that captures our output is not held open by them.
monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MONPORT]" "$D/monmap" >/dev/null
ceph-mon "${C[@]}" --mkfs -i a --monmap "$D/monmap" >"$D/log/mkfs-mon.out" 2>&1 || fail "ceph-mon --mkfs failed"
ceph-mon "${C[@]}" -i a -f </dev/null >"$D/log/mon.out" 2>&1 &
echo $! >"$D/mon.pid"
timeout 60 ceph "${C[@]}" --connect-timeout 30 osd create >/dev/null 2>"$D/log/ceph-cli.out" || fail "mon did not answer"
ceph-osd "${C[@]}" -i 0 --mkfs >"$D/log/mkfs-osd.out" 2>&1 || fail "ceph-osd --mkfs failed"
timeout 60 ceph "${C[@]}" osd crush add osd.0 1.0 host=localhost root=default >/dev/null 2>>"$D/log/ceph-cli.out" ||
  fail "osd crush add failed"
ceph-osd "${C[@]}" -i 0 -f </dev/null >"$D/log/osd.out" 2>&1 &
echo $! >"$D/osd.pid"
radosgw "${C[@]}" -n client.rgw.a -f </dev/null >"$D/log/rgw.out" 2>&1 &
echo $! >"$D/rgw.pid"

# Ready when the S3 port answers HTTP (radosgw creates its pools first, which needs the OSD up).
python3 - "$PORT" "$D" <<'PY' || fail "radosgw did not answer on port $PORT"
import os, sys, time, urllib.error, urllib.request
port, d = sys.argv[1], sys.argv[2]
deadline = time.time() + 90
while time.time() < deadline:
    for name in ("mon", "osd", "rgw"):
        pid = int(open(f"{d}/{name}.pid").read())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"{name} (pid {pid}) exited")
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)  # any HTTP answer means the frontend is serving
    except OSError:
        time.sleep(0.25)
sys.exit("timed out")
PY

timeout 60 radosgw-admin "${C[@]}" -n client.rgw.a user create --uid=ci --display-name=ci \
  --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >"$D/log/user.out" 2>&1 || fail "user create failed"

cat >"$D/s3.env" <<ENV
S3_ENDPOINT=127.0.0.1:$PORT
S3_ACCESS_KEY=$ACCESS_KEY
S3_SECRET_KEY=$SECRET_KEY
ENV
echo "READY http://127.0.0.1:$PORT"
