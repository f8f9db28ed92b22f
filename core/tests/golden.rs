//! Golden wire fixtures of schema v1: every valid fixture decodes, validates
//! and re-encodes to the same JSON value; every invalid fixture is refused
//! with the reason code in its file name (`{code}--{what}.json`). The example
//! message in `docs/wire-format.md` is checked the same way.

use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};
use driftline_core::topic;
use driftline_core::wire::{self, Mechanism, TimeBounds, WindowReport};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v1")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

fn bounds() -> TimeBounds {
    let now: DateTime<Utc> = "2026-11-27T12:00:00Z".parse().expect("timestamp");
    TimeBounds {
        now,
        max_age: TimeDelta::days(30),
        max_future: TimeDelta::hours(1),
    }
}

const TOPIC: &str = "driftline/v1/eu-kiosks/kiosk-0007/metrics";

#[test]
fn valid_fixtures_decode_and_round_trip() {
    for path in fixtures("valid") {
        let bytes = std::fs::read(&path).expect("read fixture");
        let report = wire::accept(TOPIC, &bytes, &bounds())
            .unwrap_or_else(|e| panic!("{}: refused: {e}", path.display()));
        let encoded = report.encode().expect("encode");
        let again: serde_json::Value = serde_json::from_slice(&encoded).expect("json");
        let mut original: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        // Timestamps are normalised to UTC with a `Z` suffix on encoding.
        original["window_start"] = serde_json::Value::String(
            report
                .window_start
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        assert_eq!(again, normalise_numbers(original), "{}", path.display());
        assert_eq!(wire::decode(&encoded).expect("decode again"), report);
    }
}

/// The fixtures write integral floats as `0`/`1`; the encoder writes `0.0`.
fn normalise_numbers(v: serde_json::Value) -> serde_json::Value {
    let text = serde_json::to_string(&v).expect("json");
    let report: WindowReport = serde_json::from_str(&text).expect("decode");
    serde_json::to_value(&report).expect("to value")
}

#[test]
fn golden_values_of_the_laplace_fixture() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/valid/laplace.json");
    let report =
        wire::accept(TOPIC, &std::fs::read(path).expect("read"), &bounds()).expect("valid");
    assert_eq!(report.device_id, "kiosk-0007");
    assert_eq!(report.seq, 1042);
    assert_eq!(report.privacy.mechanism, Mechanism::Laplace);
    assert_eq!(report.privacy.epsilon, Some(1.0));
    assert_eq!(
        report.error_count, -3,
        "noised counts stay negative, unclamped"
    );
    assert_eq!(report.latency_ms.counts.len(), 16);
    assert_eq!(report.categories["label"]["billing"], 21);
    assert_eq!(report.noised_fields().len(), 8);
}

#[test]
fn invalid_fixtures_are_refused_with_their_reason() {
    for path in fixtures("invalid") {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        let expected = name.split("--").next().expect("code prefix");
        let bytes = std::fs::read(&path).expect("read fixture");
        match wire::accept(TOPIC, &bytes, &bounds()) {
            Ok(_) => panic!("{name}: accepted, expected {expected}"),
            Err(e) => {
                assert_eq!(e.code(), expected, "{name}: {e}");
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

#[test]
fn messages_on_foreign_topics_are_refused() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/valid/laplace.json");
    let bytes = std::fs::read(path).expect("read");
    for t in [
        "driftline/v1/eu-kiosks/kiosk-0007/status",
        "driftline/v1/eu-kiosks/kiosk-0007",
        "somewhere/else",
    ] {
        let e = wire::accept(t, &bytes, &bounds()).expect_err("foreign topic");
        assert_eq!(e.code(), "bad_topic", "{t}");
    }
}

#[test]
fn the_documented_example_is_accepted() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/wire-format.md");
    let text = std::fs::read_to_string(doc).expect("docs/wire-format.md");
    let start = text.find("```json\n").expect("a ```json block") + "```json\n".len();
    let end = start + text[start..].find("```").expect("end of block");
    let example = &text[start..end];
    let report: WindowReport = serde_json::from_str(example).expect("example decodes");
    let t = topic::metrics_topic(&report.fleet, &report.device_id);
    let mut b = bounds();
    b.now = report.window_start + TimeDelta::minutes(5);
    wire::accept(&t, example.as_bytes(), &b).expect("documented example is accepted");
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic sweep; the fuzz target goes further.
    let valid = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/valid/laplace.json"),
    )
    .expect("read");
    for cut in 0..valid.len() {
        let _ = wire::accept(TOPIC, &valid[..cut], &bounds());
        let mut flipped = valid.clone();
        flipped[cut] ^= 0x5a;
        let _ = wire::accept(TOPIC, &flipped, &bounds());
    }
}
