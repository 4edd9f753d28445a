#!/bin/sh
# After `gcloud app deploy --no-stop-previous-version`: point the name the sites connect to at the new version's
# instance, give resolvers time to see it, then stop the versions before it. Sites reconnect (to the new address)
# when their connection to the old broker ends, i.e. when the old version stops.
#
# With SITE_BROKER_DNS_REFRESH=true (the scheduled job: App Engine's weekly restart gives the instance a new
# address and runs no deploy): point the name at the serving version's instance if it moved, stop nothing.
#
# Needs: GCP_PROJECT, VERSION (the new version id; in a refresh, the version serving traffic by default),
# SITE_BROKER_DNS_NAME (e.g. mqtt.prd.example.com.), SITE_BROKER_DNS_ZONE (the Cloud DNS managed zone that holds
# it). Optional: SITE_BROKER_DNS_TTL (60), SITE_BROKER_DNS_WAIT_SECONDS (TTL + 30: how long to wait before
# stopping the old versions).
set -eu

: "${GCP_PROJECT:?GCP_PROJECT is not set}"
: "${SITE_BROKER_DNS_NAME:?SITE_BROKER_DNS_NAME (the name sites connect to) is not set}"
: "${SITE_BROKER_DNS_ZONE:?SITE_BROKER_DNS_ZONE (its Cloud DNS managed zone) is not set}"
SERVICE=fmi-mqtt-bridge
TTL="${SITE_BROKER_DNS_TTL:-60}"
WAIT="${SITE_BROKER_DNS_WAIT_SECONDS:-$((TTL + 30))}"
REFRESH="${SITE_BROKER_DNS_REFRESH:-false}"
if [ "$REFRESH" = true ] && [ -z "${VERSION:-}" ]; then
  VERSION=$(gcloud app versions list --project="$GCP_PROJECT" --service="$SERVICE" \
    --filter="version.servingStatus=SERVING AND traffic_split>0" --format="value(version.id)" | head -n 1)
fi
: "${VERSION:?VERSION (the version just deployed) is not set}"

ip=$(gcloud app instances list --project="$GCP_PROJECT" --service="$SERVICE" --version="$VERSION" \
  --format="value(instance.vmIp)" | head -n 1)
if [ -z "$ip" ]; then
  echo "version $VERSION of $SERVICE has no instance with an address; DNS left as it was" >&2
  exit 1
fi

if current=$(gcloud dns record-sets describe "$SITE_BROKER_DNS_NAME" --type=A --zone="$SITE_BROKER_DNS_ZONE" \
  --project="$GCP_PROJECT" --format="value(rrdatas[0])" 2>/dev/null); then
  verb=update
else
  verb=create
  current=""
fi
if [ "$REFRESH" = true ] && [ "$current" = "$ip" ]; then
  echo "$SITE_BROKER_DNS_NAME -> $ip already (version $VERSION); nothing changed"
  exit 0
fi
gcloud dns record-sets "$verb" "$SITE_BROKER_DNS_NAME" --type=A --ttl="$TTL" --rrdatas="$ip" \
  --zone="$SITE_BROKER_DNS_ZONE" --project="$GCP_PROJECT"
echo "$SITE_BROKER_DNS_NAME -> $ip (TTL ${TTL} s)"
if [ "$REFRESH" = true ]; then
  exit 0  # the serving version's own instance moved: no other version to stop
fi

sleep "$WAIT"
old_versions=$(gcloud app versions list --project="$GCP_PROJECT" --service="$SERVICE" \
  --filter="version.servingStatus=SERVING AND version.id!=$VERSION" --format="value(version.id)")
for old in $old_versions; do
  # SIGTERM: the old bridge sends what it can within SHUTDOWN_FLUSH_SECONDS (see docs/deploy.md, upgrades).
  gcloud app versions stop "$old" --service="$SERVICE" --project="$GCP_PROJECT" --quiet
  echo "stopped version $old"
done
