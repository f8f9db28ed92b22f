"""docker-compose.yml validates against the Compose specification's JSON
Schema (as shipped in the docker-compose 1.29.2 wheel from PyPI, downloaded
by .ci/run into .cache/), and the files it mounts exist."""

import json
import pathlib
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
            assert cond["condition"] == "service_healthy", (name, dep)
            assert "healthcheck" in compose["services"][dep], dep


def test_ports_are_published_on_loopback_only(compose):
    """Nothing in the compose file uses TLS, so nothing listens beyond the
    host: every published port is bound to 127.0.0.1."""
    published = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"
