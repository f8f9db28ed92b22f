#!/bin/sh
# Generates the broker's secrets for docker-compose.yml (and for the test
# that runs Mosquitto with deploy/mosquitto/mosquitto.conf):
#
#   secrets.sh DIR SITE:DEVICES [SITE:DEVICES ...]
#
# DIR/ca.crt, ca.key       a CA made for this deployment
# DIR/broker.crt, .key     the broker's TLS certificate (names: broker,
#                          localhost, 127.0.0.1), signed by that CA
# DIR/passwords            Mosquitto password file: driftline-collector,
#                          broker-health, and SITE/sim-NNNNN for each
#                          simulated device
# DIR/collector.password   the collector's password
# DIR/health.password      the password of the broker's health check
# DIR/SITE.password        the password of SITE's simulated devices
#
# Every password is random and made here; none is in the repository. An
# existing DIR/passwords is kept, so restarting compose keeps its logins.
# Real devices get their own logins the same way:
#   mosquitto_passwd -b DIR/passwords FLEET/DEVICE_ID PASSWORD
set -eu
dir=$1
shift
mkdir -p "$dir"
cd "$dir"
if [ -s passwords ] && [ -s broker.crt ]; then
    echo "secrets: keeping the existing ones in $dir"
    exit 0
fi
umask 077
password() { openssl rand -hex 16; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=Driftline compose CA" -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=broker" -keyout broker.key -out broker.csr 2>/dev/null
printf 'subjectAltName=DNS:broker,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > broker.ext
openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days 825 -extfile broker.ext -out broker.crt 2>/dev/null
rm -f broker.csr broker.ext ca.srl

: > passwords
password > collector.password
mosquitto_passwd -b passwords driftline-collector "$(cat collector.password)"
password > health.password
mosquitto_passwd -b passwords broker-health "$(cat health.password)"
for site in "$@"; do
    name=${site%%:*}
    devices=${site#*:}
    password > "$name.password"
    i=0
    while [ "$i" -lt "$devices" ]; do
        mosquitto_passwd -b passwords "$(printf '%s/sim-%05d' "$name" "$i")" "$(cat "$name.password")"
        i=$((i + 1))
    done
done
# The CA's key is not needed again. The broker (user BROKER_UID, if set)
# alone reads its key and the password file; the collector and the
# simulated sites read the CA and their password.
rm -f ca.key
chmod 644 ca.crt broker.crt ./*.password
if [ -n "${BROKER_UID:-}" ]; then
    chown "$BROKER_UID" broker.key passwords
    chmod 600 broker.key passwords
else
    chmod 644 broker.key passwords
fi
echo "secrets: made a CA, the broker's certificate and $(wc -l < passwords) logins in $dir"
