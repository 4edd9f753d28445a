"""Write deploy/monitoring/: Cloud Logging log-based metrics read from the bridge's `stats` line (and the
per-label `counts in interval` lines after it), Cloud Monitoring alert policies on them, and a dashboard (a
test fails when the files differ from what this writes).

    .venv/bin/python tools/monitoring_files.py

App Engine flexible does not scrape /metrics; it does turn each JSON line on stdout into a log entry whose
`jsonPayload` holds the line's fields, and log-based metrics extract numbers from those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
SERVICE = "fmi-mqtt-bridge"
STATS_LINES = f'resource.type="gae_app" AND resource.labels.module_id="{SERVICE}" AND jsonPayload.message="stats"'
USER_METRIC = "logging.googleapis.com/user/"
BUCKETS = {"exponentialBuckets": {"numFiniteBuckets": 64, "growthFactor": 1.4, "scale": 0.01}}
VERSION_LABEL = {"key": "version", "valueType": "STRING", "description": "App Engine version of the instance"}

# name -> (stats-line field, unit, description)
DISTRIBUTIONS: dict[str, tuple[str, str, str]] = {
    "fmi_bridge_oldest_owed_age_pubsub": (
        "oldest_owed_age_seconds.pubsub",
        "s",
        "Age of the oldest reading Pub/Sub still owes: how far behind the real-time stream is.",
    ),
    "fmi_bridge_oldest_owed_age_bigquery": (
        "oldest_owed_age_seconds.bigquery",
        "s",
        "Age of the oldest record BigQuery still owes.",
    ),
    "fmi_bridge_spool_oldest_age": ("spool_oldest_age_seconds", "s", "Age of the oldest record in the spool."),
    "fmi_bridge_spool_seconds_to_full": (
        "spool_seconds_to_full",
        "s",
        "At the current intake rate and with nothing delivered, seconds until SPOOL_MAX_BYTES is reached.",
    ),
    "fmi_bridge_owed_records_pubsub": ("owed_records.pubsub", "1", "Records Pub/Sub still owes."),
    "fmi_bridge_owed_records_bigquery": ("owed_records.bigquery", "1", "Records BigQuery still owes."),
    "fmi_bridge_rejected_in_interval": (
        "rejected_in_interval",
        "1",
        "Messages rejected since the previous stats line (STATS_LOG_SECONDS, 60 s by default).",
    ),
    "fmi_bridge_received_in_interval": (
        "received_in_interval",
        "1",
        "MQTT messages received since the previous stats line.",
    ),
    "fmi_bridge_accepted_in_interval": (
        "accepted_in_interval",
        "1",
        "Valid readings spooled since the previous stats line.",
    ),
}
INTERVAL_LINES = (
    f'resource.type="gae_app" AND resource.labels.module_id="{SERVICE}" '
    'AND jsonPayload.message="counts in interval" AND jsonPayload.counts="{kind}"'
)
# name -> (the lines' `counts` kind, their label fields, description): one line per label value and interval.
LABELLED: dict[str, tuple[str, tuple[str, ...], str]] = {
    "fmi_bridge_rejects_by_reason": ("rejects", ("reason",), "Rejects since the previous stats line, by reason."),
    "fmi_bridge_sink_failures": (
        "sink failures",
        ("lane", "code"),
        "Failed sends since the previous stats line, by lane (sink/table) and status code.",
    ),
    "fmi_bridge_site_readings": (
        "site readings",
        ("site",),
        "Valid readings since the previous stats line, by site (the 50 busiest of the interval; the rest summed).",
    ),
}
# Google's own metrics a chart shows beside the bridge's, each with where Google documents it.
GOOGLE_METRICS = {
    "appengine.googleapis.com/flex/cpu/utilization": "cloud.google.com/monitoring/api/metrics_gcp (App Engine)",
    "pubsub.googleapis.com/topic/send_message_operation_count": "cloud.google.com/monitoring/api/metrics_gcp (Pub/Sub)",
}


def log_metrics() -> dict[str, dict[str, Any]]:
    metrics: dict[str, dict[str, Any]] = {
        "fmi_bridge_stats_lines": {
            "name": "fmi_bridge_stats_lines",
            "description": "One per stats line: the bridge is up and its stats reporter runs.",
            "filter": STATS_LINES,
            "metricDescriptor": {"metricKind": "DELTA", "valueType": "INT64", "unit": "1", "labels": [VERSION_LABEL]},
            "labelExtractors": {"version": "EXTRACT(resource.labels.version_id)"},
        }
    }
    for name, (field, unit, description) in DISTRIBUTIONS.items():
        metrics[name] = {
            "name": name,
            "description": description,
            # A stats line where the field is null (e.g. time to full while nothing comes in) gives no value.
            "filter": STATS_LINES,
            "metricDescriptor": {
                "metricKind": "DELTA",
                "valueType": "DISTRIBUTION",
                "unit": unit,
                "labels": [VERSION_LABEL],
            },
            "valueExtractor": f"EXTRACT(jsonPayload.{field})",
            "labelExtractors": {"version": "EXTRACT(resource.labels.version_id)"},
            "bucketOptions": BUCKETS,
        }
    for name, (kind, labels, description) in LABELLED.items():
        metrics[name] = {
            "name": name,
            "description": description,
            "filter": INTERVAL_LINES.format(kind=kind),
            "metricDescriptor": {
                "metricKind": "DELTA",
                "valueType": "DISTRIBUTION",
                "unit": "1",
                "labels": [VERSION_LABEL, *({"key": label, "valueType": "STRING"} for label in labels)],
            },
            "valueExtractor": "EXTRACT(jsonPayload.count)",
            "labelExtractors": {
                "version": "EXTRACT(resource.labels.version_id)",
                **{label: f"EXTRACT(jsonPayload.{label})" for label in labels},
            },
            "bucketOptions": BUCKETS,
        }
    return metrics


def _chart(
    title: str, metric: str, *, by: tuple[str, ...] = (), aligner: str = "ALIGN_MEAN", unit: str = ""
) -> dict[str, Any]:
    """A line chart of one metric. The bridge's figures come once per stats line (60 s): aligned on 60 s, the
    mean of a per-interval count is that count."""
    metric_type = metric if "/" in metric else f"{USER_METRIC}{metric}"
    resource = "pubsub_topic" if metric_type.startswith("pubsub.") else "gae_app"
    aggregation: dict[str, Any] = {"alignmentPeriod": "60s", "perSeriesAligner": aligner}
    if by:
        aggregation |= {"crossSeriesReducer": "REDUCE_SUM", "groupByFields": [f"metric.label.{label}" for label in by]}
    elif resource == "gae_app":
        aggregation |= {"crossSeriesReducer": "REDUCE_MAX", "groupByFields": ["resource.label.version_id"]}
    return {
        "title": title,
        "xyChart": {
            "dataSets": [
                {
                    "timeSeriesQuery": {
                        "timeSeriesFilter": {
                            "filter": f'metric.type="{metric_type}" AND resource.type="{resource}"',
                            "aggregation": aggregation,
                        }
                    },
                    "plotType": "LINE",
                    "minAlignmentPeriod": "60s",
                }
            ],
            "yAxis": {"label": unit, "scale": "LINEAR"},
        },
    }


def dashboards() -> dict[str, dict[str, Any]]:
    """What an operator needs in the first minute of an incident, top to bottom: is it up and alerting, is data
    coming in, is it going out, how long can it hold, what fails, which sites."""
    widgets = [
        {"title": "Open incidents of this project's alert policies", "incidentList": {}},
        _chart("Readings received a minute", "fmi_bridge_received_in_interval", unit="messages"),
        _chart("Readings accepted a minute", "fmi_bridge_accepted_in_interval", unit="readings"),
        _chart("Rejects a minute, by reason", "fmi_bridge_rejects_by_reason", by=("reason",), unit="messages"),
        _chart("Pub/Sub owes (records)", "fmi_bridge_owed_records_pubsub", aligner="ALIGN_PERCENTILE_99"),
        _chart("BigQuery owes (records)", "fmi_bridge_owed_records_bigquery", aligner="ALIGN_PERCENTILE_99"),
        _chart(
            "Oldest reading Pub/Sub owes", "fmi_bridge_oldest_owed_age_pubsub", aligner="ALIGN_PERCENTILE_99", unit="s"
        ),
        _chart(
            "Oldest record BigQuery owes",
            "fmi_bridge_oldest_owed_age_bigquery",
            aligner="ALIGN_PERCENTILE_99",
            unit="s",
        ),
        _chart(
            "Spool: time to full at the current intake",
            "fmi_bridge_spool_seconds_to_full",
            aligner="ALIGN_PERCENTILE_05",
            unit="s",
        ),
        _chart(
            "Failed sends a minute, by lane and code", "fmi_bridge_sink_failures", by=("lane", "code"), unit="sends"
        ),
        _chart("Readings a minute, by site", "fmi_bridge_site_readings", by=("site",), unit="readings"),
        _chart("Stats lines a minute (0: the bridge is down)", "fmi_bridge_stats_lines", aligner="ALIGN_SUM"),
        _chart("Instance CPU (App Engine flexible)", "appengine.googleapis.com/flex/cpu/utilization", unit="share"),
        _chart(
            "Messages published to the topic (Pub/Sub)",
            "pubsub.googleapis.com/topic/send_message_operation_count",
            aligner="ALIGN_RATE",
            unit="per s",
        ),
        {
            "title": "The bridge's WARNING and ERROR lines",
            "logsPanel": {
                "filter": f'resource.type="gae_app" AND resource.labels.module_id="{SERVICE}" AND severity>=WARNING'
            },
        },
    ]
    tiles = [
        {"xPos": (index % 2) * 24, "yPos": (index // 2) * 16, "width": 24, "height": 16, "widget": widget}
        for index, widget in enumerate(widgets)
    ]
    return {SERVICE: {"displayName": SERVICE, "mosaicLayout": {"columns": 48, "tiles": tiles}}}


def _above(name: str, display: str, threshold: float, *, below: bool = False, percentile: str = "99") -> dict[str, Any]:
    return {
        "displayName": display,
        "conditionThreshold": {
            "filter": f'metric.type="{USER_METRIC}{name}" AND resource.type="gae_app"',
            "aggregations": [{"alignmentPeriod": "300s", "perSeriesAligner": f"ALIGN_PERCENTILE_{percentile}"}],
            "comparison": "COMPARISON_LT" if below else "COMPARISON_GT",
            "thresholdValue": threshold,
            "duration": "600s",
            "trigger": {"count": 1},
        },
    }


def _policy(display: str, combiner: str, conditions: list[dict[str, Any]], runbook: str) -> dict[str, Any]:
    return {
        "displayName": f"{SERVICE}: {display}",
        "combiner": combiner,
        "conditions": conditions,
        "documentation": {"content": runbook, "mimeType": "text/markdown"},
        "alertStrategy": {"autoClose": "604800s"},
        "notificationChannels": [],  # added per project: gcloud alpha monitoring policies update --add-...
    }


def alert_policies() -> dict[str, dict[str, Any]]:
    return {
        "sink-lag": _policy(
            "a sink is falling behind",
            "OR",
            [
                _above("fmi_bridge_oldest_owed_age_pubsub", "Pub/Sub's oldest owed reading is over 5 minutes old", 300),
                _above(
                    "fmi_bridge_oldest_owed_age_bigquery", "BigQuery's oldest owed record is over 5 minutes old", 300
                ),
            ],
            "A sink has not taken readings for 5 minutes; they wait in the spool. Look for `sink unavailable` or "
            "`sink did not take every record` lines: a missing topic or table (`provision`), a revoked grant, "
            "an outage. See docs/reliability.md, outage budget.",
        ),
        "spool-filling": _policy(
            "the spool fills up within 2 hours",
            "AND",
            [
                _above("fmi_bridge_spool_oldest_age", "records wait in the spool for over 5 minutes", 300),
                _above(
                    "fmi_bridge_spool_seconds_to_full",
                    "at the current intake the spool is full within 2 hours",
                    7200,
                    below=True,
                    percentile="05",
                ),
            ],
            "A sink is down and the spool will be full within 2 hours; then intake stops and the broker's queue "
            "fills. Fix the sink, or raise SPOOL_MAX_BYTES and the disk. See docs/reliability.md, outage budget.",
        ),
        "reject-rate": _policy(
            "readings are being rejected",
            "OR",
            [_above("fmi_bridge_rejected_in_interval", "over 100 rejects in one stats interval", 100)],
            "Sites send messages the bridge rejects. The rejects table says why (`reason`, `detail`); a site "
            "with a new payload format or a wrong topic is the usual cause. After fixing, `replay` re-drives them.",
        ),
        "bridge-down": _policy(
            "the bridge is not running",
            "OR",
            [
                {
                    "displayName": "no stats line for 10 minutes",
                    "conditionAbsent": {
                        "filter": f'metric.type="{USER_METRIC}fmi_bridge_stats_lines" AND resource.type="gae_app"',
                        "aggregations": [{"alignmentPeriod": "300s", "perSeriesAligner": "ALIGN_SUM"}],
                        "duration": "600s",
                        "trigger": {"count": 1},
                    },
                }
            ],
            "No stats line for 10 minutes: the instance is down or restarting in a loop. "
            "`gcloud app logs tail --service=fmi-mqtt-bridge` and docs/deploy.md.",
        ),
    }


def files() -> dict[Path, str]:
    """Every file under deploy/monitoring/, path -> text."""
    out = {MONITORING / "metrics" / f"{name}.json": body for name, body in _texts(log_metrics()).items()}
    out.update({MONITORING / "policies" / f"{name}.json": body for name, body in _texts(alert_policies()).items()})
    out.update({MONITORING / "dashboards" / f"{name}.json": body for name, body in _texts(dashboards()).items()})
    return out


def _texts(documents: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: json.dumps(document, indent=2) + "\n" for name, document in documents.items()}


if __name__ == "__main__":
    for path, text in files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
