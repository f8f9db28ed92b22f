"""The published JSON Schemas (docs/wire-format.schema.json,
docs/status.schema.json) against the collector, on generated variants.

For every valid fixture of core/tests/fixtures/v1/valid and the two
documented examples of docs/wire-format.md (a window and a status), a
seeded generator makes a few hundred variants: other types (34 -> 34.0,
"34", true, null), numbers at and beyond the limits (±2^40, 2^63, 1e300,
1e400), dropped and unknown fields, bad identifiers and category names
(+ # / space, newline, empty, 129 characters), wrong array lengths,
privacy blocks changed field by field, timestamps in other forms, integer
literals written 34.0 or -0, duplicate keys, oversized payloads, other
topics. Each variant goes to the schema (Python's jsonschema) and to the
collector (`driftline-collector validate`, ingest's own checks), and:

- what the collector accepts, the schema accepts;
- what the schema accepts and the collector refuses is refused for one of
  the rules a JSON Schema cannot express, listed in docs/wire-format.md
  ("What the schemas cannot express") and in INEXPRESSIBLE below, each of
  which the variants must exercise.

The collector binary is the debug build (tests/harness.py); this test
builds nothing."""

import copy
import json
import math
import pathlib
import random
import re
import subprocess

import jsonschema
import pytest

from harness import COLLECTOR, ROOT

FIXTURES = ROOT / "core/tests/fixtures/v1/valid"
DOC = (ROOT / "docs/wire-format.md").read_text()
METRICS_SCHEMA = json.loads((ROOT / "docs/wire-format.schema.json").read_text())
STATUS_SCHEMA = json.loads((ROOT / "docs/status.schema.json").read_text())
VALIDATORS = {
    "metrics": jsonschema.Draft202012Validator(METRICS_SCHEMA),
    "status": jsonschema.Draft202012Validator(STATUS_SCHEMA),
}
# The collector's clock: the fixtures' windows end before it, within 30 days.
NOW = "2026-11-27T12:00:00Z"
METRICS_TOPIC = "driftline/v1/eu-kiosks/kiosk-0007/metrics"
STATUS_TOPIC = "driftline/v1/eu-kiosks/kiosk-0007/status"
VARIANTS_PER_BASE = 400

# The rules JSON Schema cannot express, as docs/wire-format.md lists them:
# rule -> (reason codes, a pattern the collector's detail matches). A
# variant the schema accepts may be refused only for one of these.
INEXPRESSIBLE = {
    "integer-literal": (
        {"schema_violation", "invalid_status", "unsupported_schema_version"},
        r"invalid type: floating point `[^`]*`, expected (i64|u32|u64|a u64)"
        r"|^schema_version [-+0-9.eE]+ is not supported",
    ),
    "number-range": ({"invalid_json", "invalid_status"}, r"number out of range"),
    "duplicate-keys": ({"schema_violation", "invalid_status"}, r"duplicate field"),
    "payload-size": (
        {"payload_too_large", "invalid_status"},
        r"over the limit of 65536|over the 65536 byte limit",
    ),
    "topic": (
        {"bad_topic", "topic_mismatch", "invalid_status"},
        r"is not a Driftline metrics topic|in the payload but .* in the topic"
        r"|^topic .* does not match device",
    ),
    "calendar-date": (
        {"schema_violation", "invalid_status"},
        r"is not an RFC 3339 date-time like .*: input is out of range",
    ),
    "time-bounds": (
        {"timestamp_out_of_range", "invalid_status"},
        r"^the window from .* must start at or after|^at .* is outside the accepted range",
    ),
    "window-alignment": ({"invalid_field"}, r"^window_start is not aligned"),
    "increasing-edges": (
        {"invalid_field"},
        r"\.edges edge \d+ \(.*\) is not greater than the edge before it",
    ),
    "counts-per-edges": ({"invalid_field"}, r"\.counts has \d+ counts for \d+ edges"),
    "noise-scale-keys": (
        {"invalid_field"},
        r"^privacy\.noise_scale\.(custom|categories)\..* is required by mechanism"
        r"|^privacy\.noise_scale names \".*\", which is not a noised field",
    ),
    "privacy-consistency": ({"inconsistent_privacy"}, r"^privacy\.noise_scale\..* but "),
}

# Every reason the collector gives for one message (ingest's table).
CODES = {
    "payload_too_large", "bad_topic", "invalid_json", "missing_schema_version",
    "unsupported_schema_version", "schema_violation", "topic_mismatch", "invalid_field",
    "inconsistent_privacy", "timestamp_out_of_range", "invalid_status",
}


def explain(reason, detail):
    """The inexpressible rule a refusal falls under, or None."""
    for rule, (reasons, pattern) in INEXPRESSIBLE.items():
        if reason in reasons and re.search(pattern, detail):
            return rule
    return None


def documented_example(heading=None):
    text = DOC[DOC.index(heading):] if heading else DOC
    return json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))


def bases():
    """(name, topic, message) of every valid message we know."""
    out = [(p.name, METRICS_TOPIC, json.loads(p.read_text()))
           for p in sorted(FIXTURES.glob("*.json"))]
    out.append(("docs-metrics-example", METRICS_TOPIC, documented_example()))
    out.append(("docs-status-example", STATUS_TOPIC, documented_example("## Status message")))
    return out


# --- the generator --------------------------------------------------------

class Raw:
    """A literal written into the payload text as is (34.0, -0, 1e400)."""

    def __init__(self, text, value):
        self.text, self.value = text, value


def paths(v, prefix=()):
    """Every (path, value) below v: object keys and array indexes."""
    if isinstance(v, dict):
        for k, x in v.items():
            yield prefix + (k,), x
            yield from paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield prefix + (i,), x
            yield from paths(x, prefix + (i,))


def parent(doc, path):
    for k in path[:-1]:
        doc = doc[k]
    return doc


BAD_NAME_SUFFIXES = ["+", "#", "/", " ", "\n", "é", "\t", "$"]
TIMESTAMPS = [
    "2026-11-27T10:00:00Z", "2026-11-27t10:00:00z", "2026-11-27T11:00:00+01:00",
    "2026-11-27T10:00:00.000Z", "2026-11-27T10:00:00.5Z", "2026-11-27T10:00:00-00:00",
    "2026-11-27 10:00:00Z", "2026-11-27T10:00:00+0100", "2026-11-27T10:00:00",
    "2026-11-27T10:00Z", "2026-1-27T10:00:00Z", " 2026-11-27T10:00:00Z", "2026-11-27T10:00:00Z\n",
    "2026-11-27T10:00:60Z", "2026-11-27T24:00:00Z", "2026-02-30T10:00:00Z", "2026-11-31T10:00:00Z",
    "2026-11-27T10:00:00UTC", "2026-11-27T10:00:00+24:00", "2026-11-27T10:00:00.Z",
    "2026-11-27T11:59:00Z", "2026-11-27T13:00:00Z", "2026-10-01T10:00:00Z", "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
]
HUGE = [2**40, 2**40 + 1, -(2**40), -(2**40) - 1, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63),
        1e300, -1e300, 1e15, 0.5, -1, 0, 1]


def replacements(rng, path, value):
    """Values to put at `path` in place of `value`."""
    key = path[-1] if path else None
    out = [None, True, "x", [], {}]
    if isinstance(value, bool):
        out += [0, 1, "true", not value]
    elif isinstance(value, int):
        out += [value + 1, -value - 1, float(value), str(value), Raw(f"{value}.0", float(value)),
                Raw(f"{value}e0", float(value)), rng.choice(HUGE), rng.choice(HUGE)]
        if value == 0:
            out.append(Raw("-0", 0))
    elif isinstance(value, float):
        out += [0, 0.0, -value, value * (1 + 1e-6), value * 1e6, 1e6, 1000000.0000001, 1e300,
                5e-324, round(value), str(value), Raw("1e400", math.inf), Raw("-1e400", -math.inf)]
    elif isinstance(value, str):
        out += ["", "x" * 128, "x" * 129, value + rng.choice(BAD_NAME_SUFFIXES), value.upper(),
                value + "+1", 1, rng.choice(TIMESTAMPS), rng.choice(TIMESTAMPS)]
        if key == "mechanism":
            out += ["none", "laplace", "gaussian", "Laplace", "exponential"]
        if key == "state":
            out += ["online", "offline", "ONLINE", "unknown"]
    elif isinstance(value, list):
        out += [value[:-1], value + value[-1:], value[::-1], value[:1], value * 2,
                [str(x) for x in value], [None] * len(value)]
    elif isinstance(value, dict):
        grown = dict(value)
        grown[f"extra{rng.randrange(100)}"] = rng.choice([1, {}, "x"])
        out += [grown, {k: value[k] for k in list(value)[1:]}]
    return out


def mutate(rng, doc):
    """One random change to doc (in place); returns its description."""
    all_paths = list(paths(doc))
    path, value = rng.choice(all_paths)
    where = "/".join(map(str, path))
    op = rng.random()
    container = parent(doc, path)
    if op < 0.15:
        del container[path[-1]]
        return f"drop {where}"
    if op < 0.25 and isinstance(container, dict):
        # Rename a key: unknown fields, and bad names of features,
        # categories and noise scales.
        new = str(path[-1]) + rng.choice(BAD_NAME_SUFFIXES + ["x", ".x", "", "_"])
        container[new] = container.pop(path[-1])
        return f"rename {where} -> {new!r}"
    if op < 0.32 and isinstance(value, dict):
        for i in range(rng.choice([1, 7, 8, 9, 15, 16, 17, 63, 64, 65])):
            value[f"k{i}"] = copy.deepcopy(rng.choice(list(value.values())) if value else 1)
        return f"grow {where} to {len(value)} entries"
    new = rng.choice(replacements(rng, path, value))
    container[path[-1]] = new
    return f"set {where} = {getattr(new, 'text', new)!r}"


def mutate_privacy(rng, doc):
    """A change aimed at the privacy block (and what it depends on)."""
    p = doc["privacy"]
    op = rng.randrange(9)
    if op == 0:
        p["mechanism"] = rng.choice(["none", "laplace", "gaussian"])
        return f"mechanism {p['mechanism']}"
    if op == 1:
        field = rng.choice(["epsilon", "delta", "rho", "max_events_per_window",
                            "device_day_epsilon", "device_day_delta", "noise_scale"])
        if field in p and rng.random() < 0.5:
            del p[field]
            return f"drop privacy.{field}"
        p[field] = rng.choice([None, 1e-6, 0.5, 1, 1.0, 4.0, 10, 40, 1e6, 1e6 + 1, 0, -1, 0.999999])
        return f"privacy.{field} = {p[field]!r}"
    if op == 2 and isinstance(p.get("noise_scale"), dict) and p["noise_scale"]:
        factor = rng.choice([0.5, 0.998, 0.9995, 1.0005, 1.002, math.sqrt(2), 1.9999, 2.0, 2.002,
                             3.0, 4.0, 10.0, 100.0])
        keys = list(p["noise_scale"])
        for k in rng.sample(keys, rng.choice([1, len(keys)])):
            p["noise_scale"][k] *= factor
        return f"noise scales x {factor}"
    if op == 3 and "max_events_per_window" in p:
        p["max_events_per_window"] = rng.choice([1, 2, 4, 5, 9, 11, 20, 80, 1000, 1000000, 1000001])
        return f"K = {p['max_events_per_window']}"
    if op == 4:
        doc["window_secs"] = rng.choice([1, 15, 30, 45, 60, 75, 120, 240, 480, 900, 3600, 86400, 86401])
        return f"window_secs {doc['window_secs']}"
    if op == 5 and isinstance(p.get("noise_scale"), dict):
        name = rng.choice(["custom.image_brightness", "categories.label", "custom.x", "categories.x y",
                           "latency", "custom.", "custom." + "x" * 129])
        if name in p["noise_scale"]:
            del p["noise_scale"][name]
            return f"drop noise scale {name}"
        p["noise_scale"][name] = 7.0
        return f"add noise scale {name!r}"
    if op == 6:
        feature = rng.choice(["custom", "categories"])
        if feature in doc and rng.random() < 0.5:
            del doc[feature]
            return f"drop {feature}"
        if feature == "custom":
            doc.setdefault("custom", {})["brightness"] = {"edges": [0, 0.5, 1], "counts": [1, 2]}
        else:
            doc.setdefault("categories", {})["mood"] = {"happy": 1, "c++": 0}
        return f"add a {feature} feature"
    if op == 7 and "epsilon" in p and isinstance(p["epsilon"], (int, float)):
        p["epsilon"] = rng.choice([p["epsilon"] * 2, p["epsilon"] / 2, p["epsilon"] * 1.0005, 5e-324, 1e300])
        return f"epsilon {p['epsilon']}"
    if op == 8 and "rho" in p and isinstance(p["rho"], (int, float)):
        p["rho"] = rng.choice([p["rho"] * 2, p["rho"] / 4, p["rho"] * 1.001, 5e-324, 1e300])
        return f"rho {p['rho']}"
    return mutate(rng, doc)


def serialise(doc):
    """The payload text, with Raw literals written as they are."""
    raws = []

    def swap(v):
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"__RAW_{len(raws) - 1}__"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    # allow_nan=False: 1e300 x 1e6 must not become `Infinity`, which is
    # not JSON (serialise raises; the variant is skipped).
    text = json.dumps(swap(doc), allow_nan=False)
    for i, raw in enumerate(raws):
        text = text.replace(f'"__RAW_{i}__"', raw)
    return text


def targeted(rng, doc):
    """Variants every base gets: the raw-text rules and the topics."""
    out = []
    ints = [(p, v) for p, v in paths(doc) if isinstance(v, int) and not isinstance(v, bool)]
    for path, v in rng.sample(ints, min(4, len(ints))):
        d = copy.deepcopy(doc)
        parent(d, path)[path[-1]] = Raw(f"{v}.0", float(v))
        out.append((f"{'/'.join(map(str, path))} written {v}.0", serialise(d)))
    d = copy.deepcopy(doc)
    d["schema_version"] = Raw("1.0", 1.0)
    out.append(("schema_version 1.0", serialise(d)))
    zeros = [(p, v) for p, v in ints if v == 0]
    if zeros:
        path, _ = rng.choice(zeros)
        d = copy.deepcopy(doc)
        parent(d, path)[path[-1]] = Raw("-0", 0)
        out.append((f"{'/'.join(map(str, path))} written -0", serialise(d)))
    floats = [(p, v) for p, v in paths(doc) if isinstance(v, float) and v > 0]
    for path, _ in rng.sample(floats, min(2, len(floats))):
        d = copy.deepcopy(doc)
        parent(d, path)[path[-1]] = Raw("1e400", math.inf)
        out.append((f"{'/'.join(map(str, path))} = 1e400", serialise(d)))
    text = serialise(doc)
    out.append(("duplicate key", text.replace('{"schema_version": 1,',
                                              '{"schema_version": 1, "schema_version": 1,', 1)))
    out.append(("padded to 70000 bytes", text + " " * (70000 - len(text))))
    out.append(("padded to 65536 bytes", text + " " * (65536 - len(text))))
    for ts in ["2026-02-30T10:00:00Z", "2026-11-31T10:00:00Z", "2026-11-27 10:00:00Z",
               "2026-11-27T10:00:00+0000", "2026-11-27T10:00:00z", "2025-01-01T00:00:00Z",
               "2026-10-01T10:00:00Z", "2026-11-27T13:30:00Z"]:
        d = copy.deepcopy(doc)
        d["window_start" if "window_start" in d else "at"] = ts
        out.append((f"timestamp {ts}", serialise(d)))
    return out


def variants(name, topic, doc, seed):
    """(description, topic, payload text) of a base's variants."""
    rng = random.Random(seed)
    out = [("unchanged", topic, serialise(doc))]
    out += [(what, topic, text) for what, text in targeted(rng, doc)]
    other_topics = [
        topic.replace("kiosk-0007", "kiosk-0008"), topic.replace("eu-kiosks", "us-kiosks"),
        topic.replace("/metrics", "/status") if topic.endswith("/metrics")
        else topic.replace("/status", "/metrics"),
        topic.replace("kiosk-0007", "kiosk 0007"), topic + "/x", "driftline/v2/eu-kiosks/kiosk-0007/metrics",
    ]
    out += [(f"topic {t}", t, serialise(doc)) for t in other_topics]
    seen = {text for _, _, text in out}
    while len(out) < VARIANTS_PER_BASE:
        d = copy.deepcopy(doc)
        steps = []
        try:
            for _ in range(1 if rng.random() < 0.8 else 2):
                if isinstance(d.get("privacy"), dict) and rng.random() < 0.35:
                    steps.append(mutate_privacy(rng, d))
                else:
                    steps.append(mutate(rng, d))
            text = serialise(d)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError):
            continue  # a second step on what the first one broke
        if text not in seen:
            seen.add(text)
            out.append(("; ".join(steps), topic, text))
    return [(f"{name}: {what}", t, text) for what, t, text in out]


# --- the comparison -------------------------------------------------------

def schema_accepts(topic, text):
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    kind = "status" if topic.endswith("/status") else "metrics"
    return VALIDATORS[kind].is_valid(doc)


def collector_verdicts(cases):
    assert COLLECTOR.exists(), f"build the collector first (cargo build): {COLLECTOR}"
    lines = "".join(json.dumps({"topic": t, "payload": text}) + "\n" for _, t, text in cases)
    run = subprocess.run([str(COLLECTOR), "validate", "--now", NOW], input=lines,
                         capture_output=True, text=True, timeout=300)
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(out) == len(cases), run.stderr
    assert run.returncode == (1 if any(not v["accepted"] for v in out) else 0), run.stderr
    return out


@pytest.fixture(scope="module")
def compared():
    cases = []
    for i, (name, topic, doc) in enumerate(bases()):
        cases += variants(name, topic, doc, seed=20261127 + i)
    return [(case, schema_accepts(case[1], case[2]), verdict)
            for case, verdict in zip(cases, collector_verdicts(cases))]


def test_the_documented_list_of_inexpressible_rules_is_this_one():
    section = DOC[DOC.index("### What the schemas cannot express"):]
    documented = re.findall(r"^\| `([a-z-]+)` \|", section, re.M)
    assert documented == list(INEXPRESSIBLE)


def test_every_base_message_is_accepted_by_both(compared):
    for (what, _, _), schema, verdict in compared:
        if what.endswith(": unchanged"):
            assert schema and verdict["accepted"], (what, verdict)


def test_what_the_collector_accepts_the_schema_accepts(compared):
    wrong = [(what, text[:300], verdict["detail"])
             for (what, _, text), schema, verdict in compared
             if verdict["accepted"] and not schema]
    assert not wrong, f"{len(wrong)} variants accepted by the collector only:\n" + \
        "\n".join(map(str, wrong[:20]))


def test_what_the_schema_accepts_the_collector_accepts_or_refuses_for_a_listed_rule(compared):
    wrong, used = [], set()
    for (what, _, text), schema, verdict in compared:
        assert verdict["accepted"] or verdict["reason"] in CODES, verdict
        if schema and not verdict["accepted"]:
            rule = explain(verdict["reason"], verdict["detail"])
            if rule is None:
                wrong.append((what, verdict["reason"], verdict["detail"], text[:300]))
            used.add(rule)
    assert not wrong, f"{len(wrong)} variants accepted by the schema only:\n" + \
        "\n".join(map(str, wrong[:20]))
    # Every listed rule is needed: some variant passes the schema and is
    # refused for it alone.
    assert used >= set(INEXPRESSIBLE), set(INEXPRESSIBLE) - used


def test_the_variants_cover_both_verdicts(compared):
    n = len(compared)
    accepted = sum(v["accepted"] for _, _, v in compared)
    refused_by_both = sum(not s and not v["accepted"] for _, s, v in compared)
    reasons = {v["reason"] for _, _, v in compared if not v["accepted"]}
    assert n >= 300 * len(bases())
    # Neither side wins by refusing everything.
    assert accepted >= n // 10, accepted
    assert refused_by_both >= n // 3, refused_by_both
    assert reasons == CODES, CODES ^ reasons
