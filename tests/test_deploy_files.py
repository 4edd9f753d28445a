"""The deployment files, checked without a cloud: App Engine's app.yaml rules, GitLab's CI schema, hadolint."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fmi_bridge.config import ENVIRONMENTS, SETTINGS
from fmi_bridge.container.launch import LAUNCH_SETTINGS
from fmi_bridge.container.secrets import SECRET_FILE_VARIABLES
from tests.support import cloud_sdk_python, venv_tool

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTORS = {"DEV": "dev.yml", "PPRD": "pprd.yml", "PRD": "prd.yml"}

# App Engine flexible's app.yaml: the keys it takes, and the ranges its reference gives.
TOP_LEVEL = {
    "runtime",
    "env",
    "service",
    "service_account",
    "env_variables",
    "resources",
    "network",
    "manual_scaling",
    "automatic_scaling",
    "liveness_check",
    "readiness_check",
    "beta_settings",
    "runtime_config",
    "entrypoint",
    "build_env_variables",
    "endpoints_api_service",
    "inbound_services",
    "skip_files",
}
SCALING = {"manual_scaling", "automatic_scaling"}
NETWORK = {"name", "subnetwork_name", "instance_tag", "forwarded_ports", "session_affinity", "instance_ip_mode"}
RESOURCES = {"cpu", "memory_gb", "disk_size_gb", "volumes"}
HEALTH_CHECK: dict[str, tuple[int, int] | None] = {
    "path": None,
    "check_interval_sec": (1, 300),
    "timeout_sec": (1, 300),
    "failure_threshold": (1, 10),
    "success_threshold": (1, 10),
}
LIVENESS = {**HEALTH_CHECK, "initial_delay_sec": (0, 3600)}
READINESS = {**HEALTH_CHECK, "app_start_timeout_sec": (1, 3600)}
GCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def check_health(block: dict[str, Any], rules: dict[str, tuple[int, int] | None], endpoint: str) -> None:
    assert set(block) <= set(rules), set(block) - set(rules)
    assert block["path"] == endpoint
    for key, bounds in rules.items():
        if bounds and key in block:
            assert isinstance(block[key], int) and bounds[0] <= block[key] <= bounds[1], key
    assert block["timeout_sec"] < block["check_interval_sec"]


@pytest.mark.parametrize("app_env", list(DESCRIPTORS))
def test_descriptor_follows_app_engine_flexible_rules(app_env: str) -> None:
    app = load(DESCRIPTORS[app_env])
    assert set(app) <= TOP_LEVEL, set(app) - TOP_LEVEL
    assert (app["runtime"], app["env"]) == ("custom", "flex")
    assert GCE_NAME.fullmatch(app["service"])
    assert re.fullmatch(
        r"[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9]+\.iam\.gserviceaccount\.com", app["service_account"]
    )
    assert len(SCALING & set(app)) == 1 and app["manual_scaling"] == {"instances": 1}

    resources = app["resources"]
    assert set(resources) <= RESOURCES
    cpu, memory = resources["cpu"], resources["memory_gb"]
    assert cpu == 1 or (cpu % 2 == 0 and 2 <= cpu <= 80)
    assert 0.9 <= (memory + 0.4) / cpu <= 6.5  # per-core memory, with the 0.4 GB the platform takes
    assert resources["disk_size_gb"] == 10

    network = app["network"]
    assert set(network) <= NETWORK and "vpc_access_connector" not in app
    for key in ("name", "subnetwork_name", "instance_tag"):
        assert GCE_NAME.fullmatch(network[key]), key
    for port in network["forwarded_ports"]:
        assert re.fullmatch(r"\d{1,5}(:\d{1,5})?(/(tcp|udp))?", port)
    forwarded = {int(re.split(r"[:/]", port)[0]) for port in network["forwarded_ports"]}
    variables = app["env_variables"]
    assert int(variables["MQTT_PORT"]) in forwarded

    check_health(app["liveness_check"], LIVENESS, "/liveness_check")
    check_health(app["readiness_check"], READINESS, "/readiness_check")

    assert all(isinstance(value, str) for value in variables.values())
    assert variables["APP_ENV"] == app_env
    known = {s.name for s in SETTINGS} | {s.name for s in LAUNCH_SETTINGS}
    known |= {f"{name}_SECRET" for name in SECRET_FILE_VARIABLES}
    assert set(variables) <= known, set(variables) - known
    assert variables["GCP_PROJECT_ID"] in app["service_account"]
    # Ordering holds only within one region: every environment publishes to a regional endpoint.
    assert re.fullmatch(r"[a-z]+-[a-z]+\d-pubsub\.googleapis\.com:443", variables["PUBSUB_ENDPOINT"])


def test_production_is_larger_and_secured() -> None:
    dev, pprd, prd = (load(DESCRIPTORS[env]) for env in ("DEV", "PPRD", "PRD"))
    assert prd["resources"]["cpu"] > dev["resources"]["cpu"]
    assert prd["resources"]["memory_gb"] > max(dev["resources"]["memory_gb"], pprd["resources"]["memory_gb"])
    for app in (pprd, prd):
        variables = app["env_variables"]
        assert variables["MQTT_PORT"] == "8883"
        assert {
            "MQTT_USERNAME",
            "MQTT_PASSWORD_FILE_SECRET",
            "MQTT_TLS_CA_SECRET",
            "MOSQUITTO_PASSWORD_FILE_SECRET",
            "MOSQUITTO_TLS_CERT_SECRET",
            "MOSQUITTO_TLS_KEY_SECRET",
        } <= set(variables)
        assert not {"MQTT_PASSWORD", "MQTT_PASSWORD_FILE"} & set(variables)  # no secret values in the file
    assert {
        dev["env_variables"]["GCP_PROJECT_ID"],
        pprd["env_variables"]["GCP_PROJECT_ID"],
        prd["env_variables"]["GCP_PROJECT_ID"],
    } == {"fmi-iot-dev", "fmi-iot-pprd", "fmi-iot-prd"}
    assert set(DESCRIPTORS) == set(ENVIRONMENTS) - {"LOCAL"}


def test_pipeline_is_valid_gitlab_ci() -> None:
    result = subprocess.run(
        [
            venv_tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.gitlab-ci",
            str(ROOT / "project-ci.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_pipeline_stages_gates_and_keyless_auth() -> None:
    ci = load("project-ci.yml")
    assert ci["stages"] == ["test", "build", "deploy"]
    assert "make test" in ci["test"]["script"]
    assert ci[".google-auth"]["id_tokens"]["GITLAB_OIDC_TOKEN"]["aud"].startswith("https://iam.googleapis.com/")
    text = (ROOT / "project-ci.yml").read_text()
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in text and "key-file" not in text
    jobs = {env: ci[f"deploy-{env}"] for env in ("dev", "pprd", "prd")}
    scheduled = {"if": '$CI_PIPELINE_SOURCE == "schedule"', "when": "never"}
    assert [rule.get("when") for rule in jobs["dev"]["rules"]] == ["never", None]
    for env in ("pprd", "prd"):
        assert [rule.get("when") for rule in jobs[env]["rules"]] == ["never", "manual"]
        assert jobs[env]["environment"]["name"] == env
    for name in ("test", "build", *(f"deploy-{env}" for env in jobs)):
        assert ci[name]["rules"][0] == scheduled  # the hourly DNS schedule runs none of them
    # The scheduled DNS refresh: one job per environment, its variables, never beside that environment's deploy.
    refresh = {env: ci[f"site-dns-{env}"] for env in jobs}
    assert ci[".site-dns"]["rules"] == [{"if": '$CI_PIPELINE_SOURCE == "schedule" && $SITE_DNS_REFRESH == "true"'}]
    assert "SITE_BROKER_DNS_REFRESH=true" in ci[".site-dns"]["script"][0]
    for env, job in refresh.items():
        assert job["environment"] == {"name": env, "action": "access"}  # the environment's scoped DNS variables
        assert job["resource_group"] == jobs[env]["resource_group"]
        assert job["variables"]["GCP_PROJECT"] == jobs[env]["variables"]["GCP_PROJECT"]
    assert jobs["pprd"]["needs"] == ["build", "deploy-dev"]
    assert jobs["prd"]["needs"] == ["build", "deploy-pprd"]
    assert {jobs[env]["variables"]["APP_YAML"] for env in jobs} == set(DESCRIPTORS.values())


def shellcheck(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_tool("shellcheck"), "--shell=sh", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_every_shell_line_of_the_pipeline_and_the_dns_step_is_shellcheck_clean(tmp_path: Path) -> None:
    ci = load("project-ci.yml")
    lines = [
        line
        for job in ci.values()
        if isinstance(job, dict)
        for key in ("before_script", "script")
        for line in job.get(key, [])
    ]
    assert any("site_dns.sh" in line for line in lines)
    script = tmp_path / "pipeline.sh"
    script.write_text("#!/bin/sh\nset -eu\n" + "\n".join(lines) + "\n")
    for path in (script, ROOT / "deploy" / "site_dns.sh"):
        result = shellcheck(path)
        assert result.returncode == 0, result.stdout


def test_shellcheck_is_a_real_check(tmp_path: Path) -> None:
    broken = tmp_path / "broken.sh"
    broken.write_text(
        "#!/bin/sh\nfor old in $(echo a b); do gcloud app versions stop $old --quiet; done\nif [ 1 ]; then\n"
    )
    assert shellcheck(broken).returncode != 0


# A recording stand-in for gcloud: the dry run of the DNS step (no Google API is reachable from a test).
FAKE_GCLOUD = """#!/bin/sh
echo "$*" >> "$GCLOUD_LOG"
case "$*" in
  "app instances list"*) echo 203.0.113.7 ;;
  "dns record-sets describe"*) echo "${RECORD_IP:-}"; exit "$RECORD_MISSING" ;;
  "app versions list"*) printf 'v-old\\n' ;;
esac
"""


def run_dns_step(
    tmp_path: Path, record_missing: bool, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    log.unlink(missing_ok=True)
    variables = {
        "GCP_PROJECT": "fmi-iot-prd",
        "VERSION": "abc1234",
        "SITE_BROKER_DNS_NAME": "mqtt.prd.example.com.",
        "SITE_BROKER_DNS_ZONE": "fmi-sites",
        "SITE_BROKER_DNS_WAIT_SECONDS": "0",
        **env,
    }
    result = subprocess.run(
        ["sh", str(ROOT / "deploy" / "site_dns.sh")],
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "GCLOUD_LOG": str(log),
            "RECORD_MISSING": "1" if record_missing else "0",
            "RECORD_IP": variables.pop("RECORD_IP", ""),
            **{k: v for k, v in variables.items() if v},
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result, log.read_text().splitlines() if log.exists() else []


def test_the_dns_step_points_the_sites_name_at_the_new_instance_then_stops_the_old_version(tmp_path: Path) -> None:
    result, calls = run_dns_step(tmp_path, record_missing=True)
    assert result.returncode == 0, result.stderr
    assert [call.split(" --")[0] for call in calls] == [
        "app instances list",
        "dns record-sets describe mqtt.prd.example.com.",
        "dns record-sets create mqtt.prd.example.com.",
        "app versions list",
        "app versions stop v-old",
    ]
    assert "--version=abc1234" in calls[0] and "--rrdatas=203.0.113.7" in calls[2] and "--ttl=60" in calls[2]
    assert "version.id!=abc1234" in calls[3]

    result, calls = run_dns_step(tmp_path, record_missing=False)  # the next deploy: the record exists
    assert result.returncode == 0 and calls[2].startswith("dns record-sets update mqtt.prd.example.com.")


def test_the_scheduled_refresh_moves_the_name_only_when_the_address_moved_and_stops_nothing(tmp_path: Path) -> None:
    """After App Engine's weekly restart (a new instance, a new address, no deploy)."""
    refresh = {"SITE_BROKER_DNS_REFRESH": "true", "VERSION": ""}
    result, calls = run_dns_step(tmp_path, record_missing=False, RECORD_IP="198.51.100.1", **refresh)
    assert result.returncode == 0, result.stderr
    assert [call.split(" --")[0] for call in calls] == [
        "app versions list",  # the serving version, found by itself
        "app instances list",
        "dns record-sets describe mqtt.prd.example.com.",
        "dns record-sets update mqtt.prd.example.com.",
    ]
    assert "traffic_split>0" in calls[0] and "--version=v-old" in calls[1] and "--rrdatas=203.0.113.7" in calls[3]

    result, calls = run_dns_step(tmp_path, record_missing=False, RECORD_IP="203.0.113.7", **refresh)
    assert result.returncode == 0 and "nothing changed" in result.stdout
    assert not any(call.startswith(("dns record-sets update", "app versions stop")) for call in calls)


def test_the_dns_step_names_a_missing_variable_and_changes_nothing(tmp_path: Path) -> None:
    result, calls = run_dns_step(tmp_path, record_missing=False, SITE_BROKER_DNS_ZONE="")
    assert result.returncode != 0 and "SITE_BROKER_DNS_ZONE" in result.stderr and calls == []


def test_dockerfile_is_lint_clean_and_runs_as_non_root() -> None:
    result = subprocess.run(
        [venv_tool("hadolint"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user and not user[-1].startswith(("0", "root"))
    assert 'VOLUME ["/data"]' in dockerfile and "EXPOSE 8080" in dockerfile and "HEALTHCHECK" in dockerfile
    assert 'CMD ["python", "-m", "fmi_bridge.container.launch"]' in dockerfile
    copied = " ".join(re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE))
    assert "requirements.txt" in copied and "fmi_bridge/" in copied and "schemas/" in copied


# What `gcloud app deploy` runs first on a service file: the Cloud SDK's own parser, offline.
PARSE = """
import json, sys
from googlecloudsdk.api_lib.app import yaml_parsing
for path in sys.argv[1:]:
    try:
        info = yaml_parsing.ServiceYamlInfo.FromFile(path)
        print(json.dumps({"path": path, "env": str(info.env), "service": info.module}))
    except Exception as exc:
        print(json.dumps({"path": path, "error": type(exc).__name__}))
"""


def gcloud_parse(*paths: Path) -> dict[str, dict[str, str]]:
    answers = cloud_sdk_python(PARSE, *map(str, paths))
    return {Path(answer["path"]).name: answer for answer in answers}


def test_gcloud_own_parser_accepts_every_descriptor_as_a_flexible_service() -> None:
    parsed = gcloud_parse(*(ROOT / name for name in DESCRIPTORS.values()))
    for name in DESCRIPTORS.values():
        assert parsed[name] == {"path": str(ROOT / name), "env": "Environment.FLEX", "service": "fmi-mqtt-bridge"}


def test_gcloud_own_parser_refuses_what_it_should(tmp_path: Path) -> None:
    """The parser is a real check: a mistake our own rules let through is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text((ROOT / "prd.yml").read_text().replace("instances: 1", "instances: one"))
    assert "instances: one" in broken.read_text()
    assert gcloud_parse(broken)["broken.yml"] == {"path": str(broken), "error": "YamlParseError"}


# -- docs/deploy.md, checked against the files it deploys ------------------------------------------------------

PROJECT_IDS = ("fmi-iot-dev", "fmi-iot-pprd", "fmi-iot-prd")


def deploy_guide_for(project: str) -> str:
    """docs/deploy.md with `$P` as the given project: section 1 is run once per environment."""
    return (ROOT / "docs" / "deploy.md").read_text().replace("$P", project)


def test_the_deploy_guide_lists_every_file_that_names_a_project_id() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    naming = {
        name
        for name in tracked
        if not name.startswith("tests/") and any(pid in (ROOT / name).read_text(errors="ignore") for pid in PROJECT_IDS)
    }
    guide = (ROOT / "docs" / "deploy.md").read_text()
    section = guide[guide.index("## 0. Your project ids") : guide.index("## 1.")]
    listed = {name for name in naming if f"`{name}`" in section or name == "docs/deploy.md"}
    assert naming == listed, f"files naming a project id that section 0 does not list: {sorted(naming - listed)}"


def test_the_deploy_guide_creates_everything_the_descriptors_name() -> None:
    """No step may name a resource no step creates: the network, subnet, service account and secrets of each
    descriptor are each made by a command of the guide (run with that environment's project id)."""
    for descriptor in DESCRIPTORS.values():
        app = load(descriptor)
        project = app["env_variables"]["GCP_PROJECT_ID"]
        guide = deploy_guide_for(project)
        assert f"networks create {app['network']['name']} " in guide, descriptor
        assert f"subnets create {app['network']['subnetwork_name']} " in guide, descriptor
        assert f"--target-tags={app['network']['instance_tag']}" in guide
        account, _ = app["service_account"].split("@")
        assert f"service-accounts create {account} --project={project}" in guide
        for name, value in app["env_variables"].items():
            if name.endswith("_SECRET"):
                assert f"gcloud secrets create {value} " in guide, (descriptor, value)
                assert value in guide[guide.index("for secret in") :].split("\n", 1)[0]  # and granted to the bridge
        assert f"PUBSUB_TOPIC={app['env_variables']['PUBSUB_TOPIC']}" in guide
        assert f"BIGQUERY_DATASET={app['env_variables']['BIGQUERY_DATASET']}" in guide
        assert "BIGQUERY_LOCATION=$REGION" in guide and app["env_variables"]["BIGQUERY_LOCATION"] == "us-central1"
    ci_variables = set(
        re.findall(r"\$\{?(GCP_[A-Z_]+|IMAGE_REPOSITORY|SITE_BROKER_[A-Z_]+)", (ROOT / "project-ci.yml").read_text())
    )
    guide = (ROOT / "docs" / "deploy.md").read_text()
    for variable in ci_variables - {"GCP_PROJECT", "GCP_SERVICE_ACCOUNT"}:  # the jobs' own
        assert f"`{variable}`" in guide or variable.startswith("GCP_DEPLOY_SA_"), variable
    assert "`GCP_DEPLOY_SA_DEV`, `GCP_DEPLOY_SA_PPRD`, `GCP_DEPLOY_SA_PRD`" in guide
