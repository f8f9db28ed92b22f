"""The JSON Schema of docs/wire-format.schema.json agrees with the Rust
decoder's golden fixtures: every valid fixture and the documented example
validate; the invalid fixtures that break a rule a JSON Schema can express
are refused by it too. The documented status message validates against
docs/status.schema.json. (tests/test_wire_agreement.py compares both
schemas with the collector on generated variants.)"""

import json
import pathlib
import re

import jsonschema
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs/wire-format.schema.json").read_text())
STATUS_SCHEMA = json.loads((ROOT / "docs/status.schema.json").read_text())
FIXTURES = ROOT / "core/tests/fixtures/v1"
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

# Invalid fixtures whose rule lives outside JSON Schema's reach (checked by
# the Rust decoder only): alignment, ordering, cross-field and time rules.
# Fixtures that are not JSON at all (invalid_json--*) are left out too.
SEMANTIC_ONLY = {
    "topic_mismatch--device.json",
    "topic_mismatch--fleet.json",
    "invalid_field--misaligned-window.json",
    "invalid_field--edges-not-increasing.json",
    "invalid_field--counts-mismatch.json",
    "invalid_field--unknown-noise-scale.json",
    "inconsistent_privacy--laplace-scale-too-small.json",
    "inconsistent_privacy--laplace-scale-inflated.json",
    "inconsistent_privacy--sensitivity-without-labels.json",
    "inconsistent_privacy--gaussian-one-tiny-scale.json",
    "timestamp_out_of_range--far-future.json",
    "timestamp_out_of_range--ancient.json",
    "payload_too_large--70k.json",
}


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(STATUS_SCHEMA)


def test_semantic_only_fixtures_exist_and_pass_the_schema():
    for name in SEMANTIC_ONLY:
        path = FIXTURES / "invalid" / name
        assert path.exists(), name
        if name.startswith("payload_too_large--"):
            continue
        # Listed here because the schema cannot refuse them: if it does
        # now, move the fixture out of the list so the test checks it.
        assert VALIDATOR.is_valid(json.loads(path.read_text())), name


def test_documented_status_example_validates():
    doc = (ROOT / "docs/wire-format.md").read_text()
    section = doc[doc.index("## Status message"):]
    example = re.search(r"```json\n(.*?)```", section, re.S).group(1)
    jsonschema.Draft202012Validator(STATUS_SCHEMA).validate(json.loads(example))


@pytest.mark.parametrize("path", sorted((FIXTURES / "valid").glob("*.json")), ids=lambda p: p.name)
def test_valid_fixtures_validate(path):
    VALIDATOR.validate(json.loads(path.read_text()))


def test_documented_example_validates():
    doc = (ROOT / "docs/wire-format.md").read_text()
    example = re.search(r"```json\n(.*?)```", doc, re.S).group(1)
    VALIDATOR.validate(json.loads(example))


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in (FIXTURES / "invalid").glob("*.json")
        if p.name not in SEMANTIC_ONLY and not p.name.startswith("invalid_json--")
    ),
    ids=lambda p: p.name,
)
def test_invalid_fixtures_are_refused(path):
    doc = json.loads(path.read_text())
    assert list(VALIDATOR.iter_errors(doc)), f"{path.name} should not validate"
