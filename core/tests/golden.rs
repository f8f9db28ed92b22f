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
fn every_truncation_and_flip_of_a_valid_message_gets_a_reason() {
    // A deterministic sweep; the property tests below and the fuzz target
    // (fuzz/) go further.
    let valid = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/valid/laplace.json"),
    )
    .expect("read");
    for cut in 0..valid.len() {
        check_total(&valid[..cut]).expect("truncated");
        let mut flipped = valid.clone();
        flipped[cut] ^= 0x5a;
        check_total(&flipped).expect("flipped");
    }
}

/// Every reason code the decoder can give.
const CODES: [&str; 10] = [
    "payload_too_large",
    "bad_topic",
    "invalid_json",
    "missing_schema_version",
    "unsupported_schema_version",
    "schema_violation",
    "topic_mismatch",
    "invalid_field",
    "inconsistent_privacy",
    "timestamp_out_of_range",
];

#[test]
fn every_code_has_a_row_in_the_documented_reason_table() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/wire-format.md");
    let text = std::fs::read_to_string(doc).expect("docs/wire-format.md");
    for code in CODES {
        assert!(text.contains(&format!("| `{code}` |")), "{code}");
    }
}

#[test]
fn the_coarsened_fixture_is_four_merged_windows() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/v1/valid/laplace-coarsened.json");
    let report =
        wire::accept(TOPIC, &std::fs::read(path).expect("read"), &bounds()).expect("valid");
    // K = 40 and epsilon 4 from four windows of K = 10 and epsilon 1; each
    // window's b is 10 x 7 / 1 = 70, the merged one's nearly 2 x 70.
    assert_eq!(report.implied_noise_scale(), Some(70.0));
    assert_eq!(report.max_merged_windows(), Some(16));
    let b = report.privacy.noise_scale["latency_ms"];
    assert!(b > 139.9 && b < 140.0, "{b}");
}

/// The decoder's whole contract on one input: no panic; a refusal carries a
/// known code and a message; an acceptance re-encodes to a message that is
/// accepted again, equal.
fn check_total(payload: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
    match wire::accept(TOPIC, payload, &bounds()) {
        Ok(report) => {
            let again = report.encode().expect("an accepted report encodes");
            let back =
                wire::accept(TOPIC, &again, &bounds()).expect("re-encoded report is accepted");
            proptest::prop_assert_eq!(back, report);
        }
        Err(rejection) => {
            proptest::prop_assert!(CODES.contains(&rejection.code()), "{}", rejection.code());
            proptest::prop_assert!(!rejection.to_string().is_empty());
        }
    }
    Ok(())
}

/// A JSON value of any kind, including the edges numbers and strings have.
fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::{json, Value};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1e308)),
        ".{0,40}".prop_map(Value::from),
        Just(json!("2026-11-27T10:00:00Z")),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn valid() -> Vec<serde_json::Value> {
        fixtures("valid")
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json"))
            .collect()
    }

    /// Every field path (object keys and array indexes) of a JSON value.
    fn paths(v: &serde_json::Value, prefix: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| {
                let p = format!("{prefix}/{k}");
                out.push(p.clone());
                paths(v, p, out);
            }),
            serde_json::Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| {
                let p = format!("{prefix}/{i}");
                out.push(p.clone());
                paths(v, p, out);
            }),
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_get_a_reason(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            check_total(&bytes)?;
        }

        #[test]
        fn mutated_bytes_of_a_valid_message_get_a_reason(
            which in 0usize..2,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        ) {
            let mut bytes = serde_json::to_vec(&valid()[which % valid().len()]).expect("json");
            for (at, byte, op) in edits {
                let i = at.index(bytes.len().max(1));
                match op {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i.min(bytes.len()), byte),
                    _ if i < bytes.len() => { bytes.remove(i); }
                    _ => {}
                }
            }
            check_total(&bytes)?;
        }

        #[test]
        fn a_field_replaced_by_any_value_gets_a_reason(
            which in 0usize..2,
            pick in any::<prop::sample::Index>(),
            value in any_json(),
            remove in any::<bool>(),
        ) {
            let all = valid();
            let mut doc = all[which % all.len()].clone();
            let mut fields = Vec::new();
            paths(&doc, String::new(), &mut fields);
            let path = pick.get(&fields).clone();
            let (parent, key) = path.rsplit_once('/').expect("path has a slash");
            match doc.pointer_mut(if parent.is_empty() { "" } else { parent }) {
                Some(serde_json::Value::Object(m)) if remove => { m.remove(key); }
                Some(serde_json::Value::Object(m)) => { m.insert(key.to_owned(), value); }
                Some(serde_json::Value::Array(a)) => {
                    if let Ok(i) = key.parse::<usize>() {
                        if remove { a.remove(i); } else { a[i] = value; }
                    }
                }
                _ => {}
            }
            check_total(&serde_json::to_vec(&doc).expect("json"))?;
        }
    }
}
