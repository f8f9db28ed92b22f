"""`driftline-agent privacy-report` against Google's dp-accounting.

The agent's accountant (pipeline/src/accountant.rs) must never report a
device-day epsilon below the tight value of the composition it describes,
and not more than 1.25 times above it. dp-accounting's privacy loss
distribution (PLD) accountant gives that value for the same mechanism,
scale, sensitivity and number of windows: its pessimistic estimate is an
upper bound of the tight epsilon, its optimistic estimate a lower bound.
"""
import json
import subprocess

import pytest
from dp_accounting.pld import privacy_loss_distribution as pld

from harness import AGENT

# (flags, what the configuration is)
CONFIGS = [
    (["--models", "2", "--mechanism", "laplace"], "laplace, default budget, 15-min windows"),
    (["--models", "1", "--mechanism", "laplace", "--window-secs", "3600",
      "--max-events-per-window", "5", "--device-day-epsilon", "2"], "laplace, epsilon 2, hourly"),
    (["--models", "3", "--mechanism", "laplace", "--window-secs", "3600",
      "--epsilon", "0.5", "--device-day-epsilon", "100"], "laplace, 0.5 per window, 75 windows"),
    (["--models", "2", "--mechanism", "laplace", "--window-secs", "21600",
      "--epsilon", "2", "--device-day-epsilon", "100"], "laplace, 2 per window, 10 windows"),
    (["--models", "2"], "gaussian, the agent's default"),
    (["--models", "1", "--window-secs", "3600", "--device-day-epsilon", "1",
      "--delta", "1e-8"], "gaussian, epsilon 1 at delta 1e-8"),
    (["--models", "3", "--window-secs", "1800", "--rho", "0.002",
      "--device-day-epsilon", "100"], "gaussian, rho 0.002 per window, 147 windows"),
    (["--models", "1", "--window-secs", "7200", "--max-events-per-window", "50",
      "--device-day-epsilon", "4"], "gaussian, epsilon 4, K 50"),
]


def report(flags):
    out = subprocess.run([str(AGENT), "privacy-report", "--format", "json", *flags],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def reference(r, pessimistic):
    """dp-accounting's epsilon for the report's mechanism, composed over the day."""
    if r["mechanism"] == "laplace":
        # The agent samples the discrete Laplace distribution.
        one = pld.from_discrete_laplace_mechanism(
            parameter=1 / r["noise_scale"], sensitivity=round(r["l1_sensitivity"]),
            value_discretization_interval=1e-4, pessimistic_estimate=pessimistic)
    else:
        # The discrete Gaussian's L2 sensitivity is not an integer, which
        # dp-accounting's discrete Gaussian needs: the continuous Gaussian of
        # the same sigma is the reference (zCDP covers both alike).
        one = pld.from_gaussian_mechanism(
            standard_deviation=r["noise_scale"], sensitivity=r["l2_sensitivity"],
            value_discretization_interval=1e-4, pessimistic_estimate=pessimistic,
            use_connect_dots=pessimistic)
    return one.self_compose(r["windows_per_day"]).get_epsilon_for_delta(r["delta"])


@pytest.mark.parametrize("flags,what", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_device_day_epsilon_is_tight_within_a_quarter(flags, what):
    r = report(flags)
    assert r["budget"]["windows_granted"] == r["windows_per_day"], "the budget must not bind here"
    ours = r["device_day"]["epsilon"]
    lower, upper = reference(r, pessimistic=False), reference(r, pessimistic=True)
    assert lower <= upper
    # Never below the tight value (which lies in [lower, upper]); the
    # margin covers the PLD's discretisation only.
    assert ours >= upper - 1e-3 * upper, f"{what}: ours {ours} < dp-accounting {lower}..{upper}"
    assert ours <= 1.25 * lower, f"{what}: ours {ours} > 1.25 x dp-accounting {lower}"


def test_the_default_configuration_is_at_most_epsilon_8_per_device_day():
    for mechanism in (["--mechanism", "gaussian"], ["--mechanism", "laplace"], []):
        r = report(["--models", "2", *mechanism])
        assert r["device_day"]["epsilon"] <= 8.0
        assert r["device_day"]["delta"] == 1e-6
        assert r["max_events_per_window"] == 10
    assert report(["--models", "2"])["mechanism"] == "gaussian"


def test_a_per_window_setting_over_the_budget_is_reported_as_withheld_windows():
    r = report(["--models", "1", "--mechanism", "laplace", "--window-secs", "60",
                "--epsilon", "1"])
    # A day's events can touch 1440 + 1 one-minute windows.
    assert r["budget"]["windows_granted"] < r["windows_per_day"] == 1441
    assert r["device_day"]["epsilon"] <= 8.0 < r["device_day"]["composed_epsilon"]
    text = subprocess.run([str(AGENT), "privacy-report", "--models", "1", "--mechanism",
                           "laplace", "--window-secs", "60", "--epsilon", "1"],
                          capture_output=True, text=True, check=True).stdout
    assert "budget binds" in text and f"only {r['budget']['windows_granted']} of 1441" in text


def test_check_config_prints_the_same_guarantee(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('window = "1h"\n[privacy]\ndevice_day_epsilon = 4\n'
                      '[[models]]\nid = "m"\nversion = "1"\nlabels = ["a", "b"]\n')
    out = subprocess.run([str(AGENT), "check-config", "--config", str(config)],
                         capture_output=True, text=True, check=True).stdout
    r = report(["--config", str(config)])
    assert r["windows_per_day"] == 25, "24 hourly windows, and one more a day can touch"
    assert r["per_model"][0]["per_event_sensitivity"] == 7, "labels add one count"
    assert f"epsilon {r['device_day']['epsilon']:.3f} at delta 1e-6" in out
    assert f"noise scale            {r['noise_scale']:.3f}" in out
