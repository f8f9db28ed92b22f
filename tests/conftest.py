"""Fixtures shared by the Python tests."""

import subprocess

import pytest

from harness import MOSQUITTO, free_port, wait_port


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto of this test's own on a free port (anonymous, no
    persistence); yields the port."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    yield port
    proc.terminate()
    proc.wait(timeout=10)
