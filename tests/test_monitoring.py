"""deploy/monitoring/: the log-based metrics and alert policies are what tools/monitoring_files.py writes, the
Cloud SDK's own message classes take every field (what `gcloud logging metrics create --config-from-file` and
`gcloud alpha monitoring policies create --policy-from-file` parse), and every field a metric reads is in the
stats line a running bridge prints."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import Cloud, start_bridge
from tests.support import Bridge, Broker, Published, cloud_sdk_python, publish, readings, wait_until
from tools.monitoring_files import GOOGLE_METRICS, MONITORING, SERVICE, files

ROOT = Path(__file__).resolve().parent.parent
METRICS = sorted((MONITORING / "metrics").glob("*.json"))
POLICIES = sorted((MONITORING / "policies").glob("*.json"))
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))

# Strict parse: apitools keeps fields it does not know as "unrecognized" instead of failing; they are listed.
PARSE = """
import json, sys
from apitools.base.py import encoding
from googlecloudsdk.api_lib.util import apis
types = {"metric": apis.GetMessagesModule("logging", "v2").LogMetric,
         "policy": apis.GetMessagesModule("monitoring", "v3").AlertPolicy,
         "dashboard": apis.GetMessagesModule("monitoring", "v1").Dashboard}
def unknown(message, path=""):
    found = [path + name for name in message.all_unrecognized_fields()]
    for field in message.all_fields():
        value = message.get_assigned_value(field.name)
        for item in value if isinstance(value, list) else [value]:
            if hasattr(item, "all_unrecognized_fields"):
                found += unknown(item, path + field.name + ".")
    return found
for kind, path in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        message = encoding.JsonToMessage(types[kind], open(path).read())
        print(json.dumps({"path": path, "unknown": unknown(message)}))
    except Exception as exc:
        print(json.dumps({"path": path, "error": f"{type(exc).__name__}: {exc}"}))
"""


def sdk_parse(pairs: list[tuple[str, Path]]) -> dict[str, dict[str, Any]]:
    args = [part for kind, path in pairs for part in (kind, str(path))]
    return {Path(answer["path"]).name: answer for answer in cloud_sdk_python(PARSE, *args)}


def test_the_files_are_what_the_generator_writes() -> None:
    wanted = files()
    on_disk = set(MONITORING.rglob("*.json"))
    assert on_disk == set(wanted), "run tools/monitoring_files.py"
    for path, text in wanted.items():
        assert path.read_text() == text, f"{path.name} differs: run tools/monitoring_files.py"


def test_the_cloud_sdk_takes_every_field_of_every_file() -> None:
    parsed = sdk_parse(
        [("metric", path) for path in METRICS]
        + [("policy", path) for path in POLICIES]
        + [("dashboard", path) for path in DASHBOARDS]
    )
    assert DASHBOARDS and set(parsed) == {path.name for path in METRICS + POLICIES + DASHBOARDS}
    for name, answer in parsed.items():
        assert answer.get("unknown") == [], f"{name}: {answer}"


def test_the_strict_parse_is_a_real_check(tmp_path: Path) -> None:
    policy = json.loads((MONITORING / "policies" / "sink-lag.json").read_text())
    policy["combiner"] = "EITHER"
    policy["conditions"][0]["conditionThreshold"]["threshold"] = 5  # the field is thresholdValue
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(policy))
    unknown = sdk_parse([("policy", broken)])["broken.json"]["unknown"]
    assert "combiner" in unknown and "conditions.conditionThreshold.threshold" in unknown


def test_policies_read_metrics_that_exist_and_metrics_select_this_service() -> None:
    defined = {f"logging.googleapis.com/user/{path.stem}" for path in METRICS}
    service = yaml.safe_load((ROOT / "prd.yml").read_text())["service"]
    assert service == SERVICE
    for path in METRICS:
        metric = json.loads(path.read_text())
        assert metric["name"] == path.stem
        assert f'resource.labels.module_id="{service}"' in metric["filter"]
    for path in POLICIES:
        for condition in json.loads(path.read_text())["conditions"]:
            rule = condition.get("conditionThreshold") or condition["conditionAbsent"]
            (metric_type,) = re.findall(r'metric\.type="([^"]+)"', rule["filter"])
            assert metric_type in defined, f"{path.name} reads {metric_type}, which no file defines"


def test_every_chart_reads_a_metric_the_files_define_or_google_documents() -> None:
    defined = {f"logging.googleapis.com/user/{path.stem}" for path in METRICS}
    for path in DASHBOARDS:
        tiles = json.loads(path.read_text())["mosaicLayout"]["tiles"]
        kinds = {next(key for key in tile["widget"] if key != "title") for tile in tiles}
        assert {"incidentList", "logsPanel", "xyChart"} <= kinds  # the alerts' state and the lines beside charts
        charted = set()
        for tile in tiles:
            for data in tile["widget"].get("xyChart", {}).get("dataSets", []):
                (metric_type,) = re.findall(
                    r'metric\.type="([^"]+)"', data["timeSeriesQuery"]["timeSeriesFilter"]["filter"]
                )
                assert metric_type in defined or metric_type in GOOGLE_METRICS, f"{path.name} charts {metric_type}"
                charted.add(metric_type)
        # What an operator needs in the first minute: intake, rejects by reason, what each sink owes and its
        # oldest age, the spool's time to full, failures by code, readings by site.
        wanted = [
            "accepted_in_interval", "rejects_by_reason", "owed_records_pubsub", "owed_records_bigquery",
            "oldest_owed_age_pubsub", "oldest_owed_age_bigquery", "spool_seconds_to_full", "sink_failures",
            "site_readings",
        ]  # fmt: skip
        assert {f"logging.googleapis.com/user/fmi_bridge_{name}" for name in wanted} <= charted


def test_every_field_a_metric_reads_is_in_the_stats_line(
    broker: Broker, cloud: Cloud, bridges: Callable[..., Bridge]
) -> None:
    bridge = start_bridge(bridges, cloud, broker, STATS_LOG_SECONDS="1")
    publish(broker.port, [*readings(["S1", "S2"], 5), Published("FCTS/FAE/S1/SolvExtract/T", b"not json")])
    line = wait_until(
        lambda: [e for e in bridge.log_entries() if e.get("message") == "stats" and e["received"] == 11], 30, "stats"
    )[-1]
    counted = [e for e in bridge.log_entries() if e.get("message") == "counts in interval"]
    by_kind = {kind: [e for e in counted if e["counts"] == kind] for kind in {e["counts"] for e in counted}}
    assert sorted((e["site"], e["count"]) for e in by_kind["site readings"]) == [("S1", 5), ("S2", 5)]
    assert [(e["reason"], e["count"]) for e in by_kind["rejects"]] == [("bad_json", 1)]
    for path in METRICS:
        metric = json.loads(path.read_text())
        extractor = metric.get("valueExtractor")
        if extractor is None:
            assert 'jsonPayload.message="stats"' in metric["filter"]
            continue  # a count of stats lines
        (field,) = re.fullmatch(r"EXTRACT\(jsonPayload\.([\w.]+)\)", extractor).groups()  # type: ignore[union-attr]
        if 'jsonPayload.message="counts in interval"' in metric["filter"]:
            (kind,) = re.findall(r'jsonPayload\.counts="([^"]+)"', metric["filter"])
            entries = by_kind.get(kind, [])
            if kind == "sink failures":
                continue  # none here: the sinks are up (fmi_bridge/stats.py writes its fields as the others')
            fields = [key for key, source in metric["labelExtractors"].items() if "jsonPayload" in source]
            assert entries and all(name in e for e in entries for name in fields), (path.name, entries)
            assert all(isinstance(e[field], int) for e in entries)
            continue
        assert 'jsonPayload.message="stats"' in metric["filter"]
        value: Any = line
        for part in field.split("."):
            assert isinstance(value, dict) and part in value, f"{path.name}: {field} is not in the stats line"
            value = value[part]
        assert value is None or isinstance(value, int | float), f"{path.name}: {field} = {value!r}"
    assert (
        line["rejected_in_interval"] == 1
        and line["accepted_in_interval"] == 10
        and line["spool_oldest_age_seconds"] >= 0
    )
