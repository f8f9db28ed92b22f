"""docker-compose.yml validates against the Compose specification's JSON
Schema (as shipped in the docker-compose 1.29.2 wheel from PyPI, downloaded
by .ci/run into .cache/), the files it mounts exist, and the shell lines of
its entrypoints hand each program the password and arguments meant for it."""

import json
import os
import pathlib
import subprocess
import sys
import zipfile

import jsonschema
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHEELS = sorted((ROOT / ".cache").glob("docker_compose-*.whl"))


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_spec(compose):
    assert WHEELS, "run .ci/run (it downloads the compose schema into .cache/)"
    with zipfile.ZipFile(WHEELS[-1]) as z:
        schema = json.loads(z.read("compose/config/compose_spec.json"))
    jsonschema.validate(compose, schema)


def test_mounted_files_exist_and_health_gates_the_start(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        for dep, cond in service.get("depends_on", {}).items():
            # A one-shot service (the secrets) gates by finishing; the
            # others by their health check.
            if cond["condition"] == "service_completed_successfully":
                assert "healthcheck" not in compose["services"][dep], dep
            else:
                assert cond["condition"] == "service_healthy", (name, dep)
                assert "healthcheck" in compose["services"][dep], dep


def test_ports_are_published_on_loopback_unless_configured(compose):
    """Only the broker's TLS port may leave the host, and only when
    DRIFTLINE_BROKER_BIND says so; every other port is bound to 127.0.0.1."""
    published = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert published
    for name, port in published:
        if name == "broker":
            assert port == "${DRIFTLINE_BROKER_BIND:-127.0.0.1}:8883:8883", port
        else:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"
    conf = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    listeners = [line for line in conf.splitlines() if line.startswith("listener")]
    assert listeners == ["listener 8883 0.0.0.0"], listeners
    for directive in ("certfile", "keyfile", "allow_anonymous false", "use_username_as_clientid true"):
        assert f"\n{directive}" in conf, directive


def test_no_password_is_in_the_repository(compose):
    assert not (ROOT / "deploy/mosquitto/passwords").exists()
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        assert "DRIFTLINE_MQTT_PASSWORD" not in env, name


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    """The secrets compose's `secrets` service makes, made here by the same
    script with the same arguments."""
    out = tmp_path_factory.mktemp("secrets")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["secrets"]["command"]
    assert command[:2] == ["/deploy/secrets.sh", "/secrets"]
    subprocess.run(["sh", str(ROOT / "deploy/mosquitto/secrets.sh"), str(out), *command[2:]], check=True)
    return out


def entrypoint_argv(service, secrets, program, tmp_path):
    """What `program` receives when compose runs `service`: its argv and the
    MQTT password in its environment, with /secrets moved to `secrets`."""
    entry = [part.replace("$$", "$").replace("/secrets", str(secrets)) for part in service["entrypoint"]]
    assert entry[:2] == ["sh", "-c"] and f"exec {program}" in entry[2]
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, sys\n"
        "print(json.dumps([sys.argv[1:], os.environ.get('DRIFTLINE_MQTT_PASSWORD')]))\n"
    )
    entry[2] = entry[2].replace(f"exec {program}", f"exec {sys.executable} {probe}")
    env = {k: str(v) for k, v in service.get("environment", {}).items() if v is not None}
    out = subprocess.run(
        [*entry, *service.get("command", [])],
        env={"PATH": os.environ["PATH"], **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def test_every_site_logs_in_with_its_own_password(compose, secrets, tmp_path):
    seen = {}
    for name, service in compose["services"].items():
        if not name.startswith("agent-"):
            continue
        argv, password = entrypoint_argv(service, secrets, "driftline-agent", tmp_path)
        fleet = service["environment"]["DRIFTLINE_FLEET"]
        assert argv[:2] == ["simulate", "--live"], argv
        assert argv[argv.index("--fleet") + 1] == fleet
        assert service["environment"]["DRIFTLINE_MQTT_USERNAME"] == "{fleet}/{device}"
        assert password == (secrets / f"{fleet}.password").read_text().strip()
        seen[fleet] = argv
    assert sorted(seen) == ["site-a", "site-b", "site-c"]
    assert "--drift-at" in seen["site-c"] and "--drift-at" not in seen["site-a"]
    # Every simulated device has a login in the password file.
    logins = {line.split(":")[0] for line in (secrets / "passwords").read_text().splitlines()}
    for fleet in seen:
        assert f"{fleet}/sim-00019" in logins and f"{fleet}/sim-00020" not in logins


def test_the_collector_logs_in_with_its_password(compose, secrets, tmp_path):
    service = compose["services"]["collector"]
    argv, password = entrypoint_argv(service, secrets, "driftline-collector", tmp_path)
    assert argv == ["serve"]
    assert password == (secrets / "collector.password").read_text().strip()
    assert service["environment"]["DRIFTLINE_BROKER"] == "mqtts://broker:8883"
