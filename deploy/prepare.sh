#!/bin/sh
# Generate what deploy/compose.yaml mounts, into deploy/generated/ (git-ignored):
#   generated/broker/       meshwatch broker-config's output, credentials.csv included (private)
#   generated/mosquitto/    mosquitto.conf, passwd, acl and certs/: the broker's /mosquitto/config
#   generated/env/*.env     each service's broker account, as MESHWATCH_* variables
#   generated/grafana/      meshwatch dashboards export: dashboards and provisioning
#   generated/registry.csv  the device registry the services read
# Run it again after the registry changes: existing accounts keep their passwords.
#
# usage: deploy/prepare.sh --registry FILE (--tls-dir DIR | --self-signed HOST)
#   --registry FILE     device registry CSV (gateways get broker accounts from it)
#   --tls-dir DIR       DIR/server.crt, DIR/server.key, DIR/ca.crt: the broker's TLS listener
#   --self-signed HOST  make a throw-away CA and a certificate for HOST instead (trials only)
# Environment: MESHWATCH (the meshwatch command, default: meshwatch on PATH),
#   MESHWATCH_INFLUXDB__BUCKET (Grafana's InfluxQL database, default meshwatch).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out="$here/generated"
meshwatch=${MESHWATCH:-meshwatch}
bucket=${MESHWATCH_INFLUXDB__BUCKET:-meshwatch}
registry=""
tls_dir=""
self_signed=""

usage() {
    sed -n '10,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
die() {
    echo "prepare.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --registry) [ $# -ge 2 ] || usage; registry=$2; shift 2 ;;
        --tls-dir) [ $# -ge 2 ] || usage; tls_dir=$2; shift 2 ;;
        --self-signed) [ $# -ge 2 ] || usage; self_signed=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "prepare.sh: unknown option $1" >&2; usage ;;
    esac
done
[ -n "$registry" ] || die "--registry FILE is required (meshwatch simulate --out DIR writes DIR/registry.csv)"
[ -f "$registry" ] || die "registry $registry is not a file"
if [ -n "$tls_dir" ] && [ -n "$self_signed" ]; then
    die "give --tls-dir or --self-signed, not both"
fi
[ -n "$tls_dir" ] || [ -n "$self_signed" ] || die "give --tls-dir DIR (server.crt, server.key, ca.crt) or --self-signed HOST"
command -v "$meshwatch" >/dev/null 2>&1 || die "$meshwatch not found; activate the venv or set MESHWATCH=/path/to/meshwatch"

# Everything under generated/ is readable by this user only; the directories the containers
# mount are opened up below for the containers' own users (mosquitto, grafana).
umask 077
mkdir -p "$out"
chmod 700 "$out"

if [ -n "$self_signed" ]; then  # made once; delete generated/self-signed for new ones
    tls_dir="$out/self-signed"
    if [ ! -f "$tls_dir/server.crt" ]; then
        mkdir -p "$tls_dir"
        ( cd "$tls_dir"
          openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
              -keyout ca.key -out ca.crt -days 825 -subj "/CN=meshwatch trial CA" 2>/dev/null
          openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
              -keyout server.key -out server.csr -subj "/CN=$self_signed" 2>/dev/null
          printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n' "$self_signed" > san.ext
          openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
              -out server.crt -days 825 -extfile san.ext 2>/dev/null )
    fi
fi
for name in server.crt server.key ca.crt; do
    [ -f "$tls_dir/$name" ] || die "$tls_dir/$name is missing"
done

# 1. The broker: accounts for every registry gateway and the three services.
"$meshwatch" broker-config --registry "$registry" --out "$out/broker" \
    --bind 0.0.0.0 --port 1883 \
    --tls-cert "$tls_dir/server.crt" --tls-key "$tls_dir/server.key" --tls-ca "$tls_dir/ca.crt" \
    --tls-port 8883 --tls-bind 0.0.0.0 \
    --accounts bridge,dataflow,remediation \
    --install-dir /mosquitto/config --tls-install-dir /mosquitto/config/certs \
    --data-dir /mosquitto/data --log-file /mosquitto/log/mosquitto.log --user mosquitto

# The broker's mount, without credentials.csv. mosquitto reads it as its own user (uid 1883 in
# the image), so the files are world-readable, inside generated/ that only this user can enter.
rm -rf "$out/mosquitto"
mkdir -p "$out/mosquitto/certs"
cp "$out/broker/mosquitto.conf" "$out/broker/passwd" "$out/broker/acl" "$out/mosquitto/"
cp "$tls_dir/server.crt" "$tls_dir/server.key" "$tls_dir/ca.crt" "$out/mosquitto/certs/"
chmod 755 "$out/mosquitto" "$out/mosquitto/certs"
chmod 644 "$out/mosquitto/mosquitto.conf" "$out/mosquitto/passwd" "$out/mosquitto/acl" \
    "$out/mosquitto/certs/server.crt" "$out/mosquitto/certs/server.key" "$out/mosquitto/certs/ca.crt"

# 2. Each service's account, as environment variables compose hands to that service only.
password_of() {
    awk -F, -v user="$1" 'NR > 1 && $1 == user { print $2 }' "$out/broker/credentials.csv"
}
account_env() {  # section user
    password=$(password_of "$2")
    [ -n "$password" ] || die "no password for account $2 in $out/broker/credentials.csv"
    printf 'MESHWATCH_%s__USERNAME=%s\nMESHWATCH_%s__PASSWORD=%s\n' "$1" "$2" "$1" "$password"
}
mkdir -p "$out/env"
{ account_env SITE_BROKER bridge; account_env MESH_BROKER bridge; } > "$out/env/bridge.env"
account_env MESH_BROKER dataflow > "$out/env/flow.env"
account_env MESH_BROKER remediation > "$out/env/remediation.env"

# 3. Grafana: the dashboards and their provisioning, as Grafana sees them in its container.
"$meshwatch" dashboards export "$out/grafana" --influx-url http://influxdb:8086 \
    --database "$bucket" --dashboards-path /etc/grafana/dashboards/meshwatch
find "$out/grafana" -type d -exec chmod 755 {} +
find "$out/grafana" -type f -exec chmod 644 {} +

# 4. The registry, mounted read-only into bridge, flow and remediation.
cp "$registry" "$out/registry.csv"
chmod 644 "$out/registry.csv"

cat <<DONE
prepared $out
next:
  cp $here/.env.example $here/.env    # once; then replace every change-me
  docker compose -f $here/compose.yaml up -d --build
gateways: hand each its line of $out/broker/credentials.csv and $tls_dir/ca.crt
DONE
