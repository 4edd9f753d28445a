#!/bin/sh
# After `gcloud app deploy --no-stop-previous-version`: point the name the sites connect to at the new version's
# instance, give resolvers time to see it, then stop the versions before it. Sites reconnect (to the new address)
# when their connection to the old broker ends, i.e. when the old version stops.
#
# Needs: GCP_PROJECT, VERSION (the new version id), SITE_BROKER_DNS_NAME (e.g. mqtt.prd.example.com.),
# SITE_BROKER_DNS_ZONE (the Cloud DNS managed zone that holds it). Optional: SITE_BROKER_DNS_TTL (60),
# SITE_BROKER_DNS_WAIT_SECONDS (TTL + 30: how long to wait before stopping the old versions).
set -eu

: "${GCP_PROJECT:?GCP_PROJECT is not set}"
: "${VERSION:?VERSION (the version just deployed) is not set}"
: "${SITE_BROKER_DNS_NAME:?SITE_BROKER_DNS_NAME (the name sites connect to) is not set}"
: "${SITE_BROKER_DNS_ZONE:?SITE_BROKER_DNS_ZONE (its Cloud DNS managed zone) is not set}"
SERVICE=fmi-mqtt-bridge
TTL="${SITE_BROKER_DNS_TTL:-60}"
WAIT="${SITE_BROKER_DNS_WAIT_SECONDS:-$((TTL + 30))}"

ip=$(gcloud app instances list --project="$GCP_PROJECT" --service="$SERVICE" --version="$VERSION" \
  --format="value(instance.vmIp)" | head -n 1)
if [ -z "$ip" ]; then
  echo "version $VERSION of $SERVICE has no instance with an address; DNS left as it was" >&2
  exit 1
fi

if gcloud dns record-sets describe "$SITE_BROKER_DNS_NAME" --type=A --zone="$SITE_BROKER_DNS_ZONE" \
  --project="$GCP_PROJECT" >/dev/null 2>&1; then
  verb=update
else
  verb=create
fi
gcloud dns record-sets "$verb" "$SITE_BROKER_DNS_NAME" --type=A --ttl="$TTL" --rrdatas="$ip" \
  --zone="$SITE_BROKER_DNS_ZONE" --project="$GCP_PROJECT"
echo "$SITE_BROKER_DNS_NAME -> $ip (TTL ${TTL} s)"

sleep "$WAIT"
old_versions=$(gcloud app versions list --project="$GCP_PROJECT" --service="$SERVICE" \
  --filter="version.servingStatus=SERVING AND version.id!=$VERSION" --format="value(version.id)")
for old in $old_versions; do
  # SIGTERM: the old bridge sends what it can within SHUTDOWN_FLUSH_SECONDS (see docs/deploy.md, upgrades).
  gcloud app versions stop "$old" --service="$SERVICE" --project="$GCP_PROJECT" --quiet
  echo "stopped version $old"
done
