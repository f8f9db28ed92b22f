//! MQTT topic layout (docs/wire-format.md):
//!
//! - `driftline/v1/{fleet}/{device_id}/metrics`: one [`crate::wire::WindowReport`]
//!   per device, model and window, QoS 1.
//! - `driftline/v1/{fleet}/{device_id}/status`: retained device status, also the
//!   agent's last will.
//!
//! `fleet` and `device_id` are identifiers (see [`check_identifier`]), so they
//! can never contain the MQTT separators `/`, `+` or `#`.

/// Topic prefix shared by every Driftline topic; the `v1` is the topic layout
/// version, independent of the payload `schema_version`.
pub const PREFIX: &str = "driftline/v1";
/// Subscription filter matching every device's metrics topic.
pub const METRICS_FILTER: &str = "driftline/v1/+/+/metrics";
/// Subscription filter matching every device's status topic.
pub const STATUS_FILTER: &str = "driftline/v1/+/+/status";

/// Longest identifier accepted (device ids, fleets, model ids, versions).
pub const MAX_IDENTIFIER_LEN: usize = 128;

/// Which of a device's topics a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Metrics,
    Status,
}

/// A parsed Driftline topic, borrowing from the topic string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceTopic<'a> {
    pub fleet: &'a str,
    pub device_id: &'a str,
    pub kind: TopicKind,
}

/// `driftline/v1/{fleet}/{device_id}/metrics`
pub fn metrics_topic(fleet: &str, device_id: &str) -> String {
    format!("{PREFIX}/{fleet}/{device_id}/metrics")
}

/// `driftline/v1/{fleet}/{device_id}/status`
pub fn status_topic(fleet: &str, device_id: &str) -> String {
    format!("{PREFIX}/{fleet}/{device_id}/status")
}

/// Parses a topic of the Driftline layout; `None` for anything else,
/// including topics whose fleet or device id is not a valid identifier.
pub fn parse(topic: &str) -> Option<DeviceTopic<'_>> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (fleet, device_id, leaf) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let kind = match leaf {
        "metrics" => TopicKind::Metrics,
        "status" => TopicKind::Status,
        _ => return None,
    };
    check_identifier(fleet).ok()?;
    check_identifier(device_id).ok()?;
    Some(DeviceTopic {
        fleet,
        device_id,
        kind,
    })
}

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    #[error("is empty")]
    Empty,
    #[error("is {len} bytes long, over the limit of {MAX_IDENTIFIER_LEN}")]
    TooLong { len: usize },
    /// `allowed` lists the punctuation the rule allows beside ASCII
    /// letters and digits: `. _ : -` for identifiers, also `+` for versions.
    #[error("contains {found:?}; allowed are ASCII letters, digits and {allowed}")]
    BadCharacter { found: char, allowed: &'static str },
}

/// Identifiers (fleet, device id, model id) are 1 to 128 characters from
/// `[A-Za-z0-9._:-]`: safe as MQTT topic levels, file names and SQL literals.
pub fn check_identifier(s: &str) -> Result<(), IdentifierError> {
    check_chars(s, ". _ : -", |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
    })
}

/// Versions (model version, agent version) also allow `+` for semver build
/// metadata, e.g. `2.1.0+onnx`; category names follow the same rule.
pub fn check_version(s: &str) -> Result<(), IdentifierError> {
    check_chars(s, ". _ : - +", |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-' | '+')
    })
}

fn check_chars(
    s: &str,
    punctuation: &'static str,
    allowed: impl Fn(char) -> bool,
) -> Result<(), IdentifierError> {
    if s.is_empty() {
        return Err(IdentifierError::Empty);
    }
    if s.len() > MAX_IDENTIFIER_LEN {
        return Err(IdentifierError::TooLong { len: s.len() });
    }
    match s.chars().find(|c| !allowed(*c)) {
        Some(found) => Err(IdentifierError::BadCharacter {
            found,
            allowed: punctuation,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let t = metrics_topic("eu-kiosks", "kiosk-17");
        assert_eq!(t, "driftline/v1/eu-kiosks/kiosk-17/metrics");
        let parsed = parse(&t).expect("valid topic");
        assert_eq!(parsed.fleet, "eu-kiosks");
        assert_eq!(parsed.device_id, "kiosk-17");
        assert_eq!(parsed.kind, TopicKind::Metrics);
        let s = status_topic("f", "d");
        assert_eq!(parse(&s).map(|p| p.kind), Some(TopicKind::Status));
    }

    #[test]
    fn foreign_topics_are_not_parsed() {
        for t in [
            "driftline/v1/f/d/metrics/extra",
            "driftline/v1/f/metrics",
            "driftline/v2/f/d/metrics",
            "driftline/v1/f/d/other",
            "driftline/v1//d/metrics",
            "driftline/v1/f/d d/metrics",
            "other/v1/f/d/metrics",
        ] {
            assert_eq!(parse(t), None, "{t}");
        }
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(check_identifier("model-0.v2_a:b").is_ok());
        assert_eq!(check_identifier(""), Err(IdentifierError::Empty));
        assert_eq!(
            check_identifier("a/b"),
            Err(IdentifierError::BadCharacter {
                found: '/',
                allowed: ". _ : -"
            })
        );
        assert!(matches!(
            check_identifier(&"x".repeat(129)),
            Err(IdentifierError::TooLong { len: 129 })
        ));
        assert!(check_version("2.1.0+onnx").is_ok());
        assert!(check_identifier("2.1.0+onnx").is_err());
        // Each error names the rule that applies: versions allow `+`.
        let e = check_version("2.1 beta").expect_err("space");
        assert_eq!(
            e.to_string(),
            "contains ' '; allowed are ASCII letters, digits and . _ : - +"
        );
        let e = check_identifier("a+b").expect_err("plus");
        assert_eq!(
            e.to_string(),
            "contains '+'; allowed are ASCII letters, digits and . _ : -"
        );
    }
}
