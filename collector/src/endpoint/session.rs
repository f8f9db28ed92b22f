//! Per-connection settings and the statements that only touch them:
//! `SET`, `SHOW`, `RESET`, `DISCARD`, `DEALLOCATE` and the transaction
//! statements.
//!
//! A connection's settings live in its own metadata (pgwire keeps one map
//! per connection), under the setting's lower-case name: what one client
//! sets, no other sees, and nothing reaches the shared DataFusion session.
//! Only PostgreSQL settings of [`crate::query::pg::SETTINGS`] can be set;
//! DataFusion's own options (`datafusion.*`, in any quoting) are the
//! server's and refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::sql::sqlparser::ast::{
    DiscardObject, Expr, Reset, ResetStatement, Set, Statement, TransactionAccessMode,
    TransactionMode, Value,
};
use futures::{Sink, SinkExt};
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::ClientInfo;
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::response::TransactionStatus;
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::PgWireBackendMessage;

use super::queries::SqlError;
use crate::query::pg;
use datafusion_postgres::pgwire;

/// Where a connection's value of setting `name` was before its first `SET`
/// (from the startup packet), for `RESET`.
fn startup_key(name: &str) -> String {
    format!("startup:{name}")
}

/// The settings a statement runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    time_zone: String,
    statement_timeout: Option<Duration>,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            time_zone: "UTC".to_owned(),
            statement_timeout: None,
        }
    }
}

impl Session {
    /// The settings of the connection whose metadata this is.
    pub fn of(metadata: &HashMap<String, String>) -> Self {
        let mut session = Session::default();
        if let Some(tz) = metadata.get("timezone") {
            session.time_zone = tz.clone();
        }
        session.statement_timeout = metadata
            .get("statement_timeout")
            .and_then(|t| parse_duration(t).ok())
            .filter(|d| !d.is_zero());
        session
    }

    pub fn time_zone(&self) -> &str {
        &self.time_zone
    }

    #[cfg(test)]
    pub fn set_time_zone(&mut self, tz: &str) {
        self.time_zone = tz.to_owned();
    }

    /// The connection's statement time limit: its own `statement_timeout`
    /// when set and shorter, else the server's. A client can lower the
    /// limit, never raise it.
    pub fn statement_timeout(&self, server: Duration) -> Duration {
        self.statement_timeout.map_or(server, |t| t.min(server))
    }
}

/// What the protocol layer does with a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Answered here, from and to the connection's settings.
    Session,
    /// `DECLARE` / `FETCH` / `CLOSE`: cursors, whose queries are checked.
    Cursor,
    /// Planned, checked and run by the query handler.
    Query,
}

pub fn kind(statement: &Statement) -> Kind {
    match statement {
        Statement::Set(_)
        | Statement::ShowVariable { .. }
        | Statement::Reset(_)
        | Statement::Discard { .. }
        | Statement::Deallocate { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => Kind::Session,
        Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. } => {
            Kind::Cursor
        }
        _ => Kind::Query,
    }
}

/// Whether `statement` may run in a transaction that already failed
/// (PostgreSQL lets only its end, or a return to a savepoint, through).
pub fn ends_failed_transaction(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Commit { .. } | Statement::Rollback { .. }
    )
}

/// The result columns of a session statement (`SHOW` has one, or three
/// for `SHOW ALL`), for the extended protocol's Describe.
pub fn result_columns(statement: &Statement) -> Vec<String> {
    match show_name(statement).as_deref() {
        Some("all") => vec!["name".into(), "setting".into(), "description".into()],
        Some(name) => vec![name.to_owned()],
        None => Vec::new(),
    }
}

/// The setting `SHOW` asks for, normalised ("TIME ZONE" -> "timezone").
fn show_name(statement: &Statement) -> Option<String> {
    let Statement::ShowVariable { variable } = statement else {
        return None;
    };
    let words: Vec<String> = variable.iter().map(|i| i.value.to_lowercase()).collect();
    Some(match words.join(" ").as_str() {
        "time zone" => "timezone".to_owned(),
        "transaction isolation level" => "transaction_isolation".to_owned(),
        "session authorization" => "session_authorization".to_owned(),
        other => other.to_owned(),
    })
}

/// The name PostgreSQL reports a setting's changes under (ParameterStatus),
/// for the settings it reports.
fn reported_name(name: &str) -> Option<&'static str> {
    Some(match name {
        "timezone" => "TimeZone",
        "datestyle" => "DateStyle",
        "intervalstyle" => "IntervalStyle",
        "application_name" => "application_name",
        "client_encoding" => "client_encoding",
        _ => return None,
    })
}

/// Parses a PostgreSQL duration setting: a number of milliseconds, or a
/// number with a unit (us, ms, s, min, h, d).
fn parse_duration(text: &str) -> Result<Duration, ()> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| ())?;
    let ms = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "ms" => 1.0,
        "us" => 0.001,
        "s" => 1e3,
        "min" => 60e3,
        "h" => 3600e3,
        "d" => 86_400e3,
        _ => return Err(()),
    };
    let ms = number * ms;
    if !ms.is_finite() || !(0.0..=1e15).contains(&ms) {
        return Err(());
    }
    Ok(Duration::from_micros((ms * 1e3) as u64))
}

fn invalid(name: &str, value: &str, why: &str) -> SqlError {
    SqlError::new(
        "22023",
        format!("invalid value for parameter \"{name}\": \"{value}\"{why}"),
    )
}

/// Checks a value for setting `name` and returns it as stored.
fn validate(name: &str, value: &str) -> Result<String, SqlError> {
    let lower = value.trim().to_ascii_lowercase();
    match name {
        "timezone" => {
            use std::str::FromStr as _;
            let tz = datafusion::arrow::array::timezone::Tz::from_str(value.trim()).or_else(|_| {
                datafusion::arrow::array::timezone::Tz::from_str(&value.trim().to_uppercase())
            });
            match tz {
                Ok(_) if lower == "utc" || lower == "gmt" || lower == "z" => Ok("UTC".to_owned()),
                Ok(_) => Ok(value.trim().to_owned()),
                Err(_) => Err(invalid(
                    "TimeZone",
                    value,
                    " (a zone name such as Europe/Berlin, or an ISO 8601 offset such as -03:00)",
                )),
            }
        }
        "datestyle" if lower.contains("iso") => Ok(value.trim().to_uppercase()),
        "datestyle" => Err(invalid(
            "DateStyle",
            value,
            " (this server writes dates in ISO format only)",
        )),
        "intervalstyle" => match lower.as_str() {
            "postgres" | "postgres_verbose" | "sql_standard" | "iso_8601" => Ok(lower),
            _ => Err(invalid("IntervalStyle", value, "")),
        },
        "client_encoding" => match lower.as_str() {
            "utf8" | "utf-8" | "unicode" => Ok("UTF8".to_owned()),
            _ => Err(invalid(name, value, " (this server speaks UTF8 only)")),
        },
        "bytea_output" => match lower.as_str() {
            "hex" | "escape" => Ok(lower),
            _ => Err(invalid(name, value, "")),
        },
        "extra_float_digits" => match lower.parse::<i8>() {
            Ok(n) if (-15..=3).contains(&n) => Ok(n.to_string()),
            _ => Err(invalid(name, value, " (an integer from -15 to 3)")),
        },
        "statement_timeout" | "lock_timeout" | "idle_in_transaction_session_timeout" => {
            parse_duration(value)
                .map(|_| value.trim().to_owned())
                .map_err(|_| {
                    invalid(
                        name,
                        value,
                        " (milliseconds, or a number with us, ms, s, min, h or d)",
                    )
                })
        }
        _ => Ok(value.to_owned()),
    }
}

/// A `SET` value as text: `'a'`, `a`, `1`, and lists (`a, b`) joined.
fn value_text(values: &[Expr]) -> String {
    values
        .iter()
        .map(|v| match v {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => n.clone(),
                other => other
                    .clone()
                    .into_string()
                    .unwrap_or_else(|| other.to_string()),
            },
            Expr::Identifier(i) => i.value.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a `SET` value is `DEFAULT` (or `LOCAL` for the time zone).
fn is_default(values: &[Expr]) -> bool {
    matches!(values, [Expr::Identifier(i)] if i.quote_style.is_none()
        && (i.value.eq_ignore_ascii_case("default") || i.value.eq_ignore_ascii_case("local")))
}

/// A connection's change to its settings: `Some(value)` sets, `None`
/// returns to the value it started with.
type Change = (String, Option<String>);

/// The change a `SET` asks for, checked.
fn set_change(set: &Set) -> Result<Vec<Change>, SqlError> {
    match set {
        Set::SingleAssignment {
            hivevar: false,
            variable,
            values,
            ..
        } => {
            let name = variable.to_string().replace('"', "").to_lowercase();
            if is_default(values) {
                return Ok(vec![(checked_name(&name, None)?, None)]);
            }
            let value = value_text(values);
            let name = checked_name(&name, Some(&value))?;
            Ok(vec![(name.clone(), Some(validate(&name, &value)?))])
        }
        Set::SetTimeZone { value, .. } => {
            let values = std::slice::from_ref(value);
            if is_default(values) {
                return Ok(vec![("timezone".into(), None)]);
            }
            let value = value_text(values);
            Ok(vec![(
                "timezone".into(),
                Some(validate("timezone", &value)?),
            )])
        }
        Set::SetNames { charset_name, .. } => Ok(vec![(
            "client_encoding".into(),
            Some(validate("client_encoding", &charset_name.value)?),
        )]),
        Set::SetTransaction { modes, .. } => {
            if modes.iter().any(|m| {
                matches!(
                    m,
                    TransactionMode::AccessMode(TransactionAccessMode::ReadWrite)
                )
            }) {
                return Err(SqlError::read_only("READ WRITE"));
            }
            Ok(Vec::new())
        }
        other => Err(SqlError::new(
            "42501",
            format!("permission denied: {other} is not supported by the Driftline SQL endpoint"),
        )),
    }
}

/// `name` if a connection may set it to `value` (`None`: reset).
fn checked_name(name: &str, value: Option<&str>) -> Result<String, SqlError> {
    if name.starts_with("datafusion.") {
        return Err(SqlError::read_only(&format!(
            "SET {name} (engine settings are the server's)"
        )));
    }
    let Some(setting) = pg::find(name) else {
        return Err(SqlError::new(
            "42704",
            format!("unrecognized configuration parameter \"{name}\""),
        ));
    };
    let unchanged = value.is_some_and(|v| v.eq_ignore_ascii_case(setting.value));
    if !setting.settable && !unchanged {
        return Err(SqlError::new(
            "55P02",
            format!("parameter \"{name}\" cannot be changed"),
        ));
    }
    Ok(setting.name.to_owned())
}

/// Applies changes to a connection's metadata; returns the reported
/// settings that changed, with their new values.
fn apply(metadata: &mut HashMap<String, String>, changes: Vec<Change>) -> Vec<(String, String)> {
    let mut reported = Vec::new();
    for (name, value) in changes {
        let value = value.or_else(|| metadata.get(&startup_key(&name)).cloned());
        match value {
            Some(v) => metadata.insert(name.clone(), v),
            None => metadata.remove(&name),
        };
        if let Some(report) = reported_name(&name) {
            reported.push((report.to_owned(), current(metadata, &name)));
        }
    }
    reported
}

/// A connection's value of setting `name`.
fn current(metadata: &HashMap<String, String>, name: &str) -> String {
    metadata
        .get(name)
        .cloned()
        .or_else(|| pg::setting(name).map(str::to_owned))
        .unwrap_or_default()
}

/// Takes the settings a client sent in its startup packet (`TimeZone`,
/// `DateStyle`, `-c name=value` in `options`, ...) as the connection's own,
/// checked like `SET`; values that do not pass are dropped.
pub fn adopt_startup_parameters(metadata: &mut HashMap<String, String>) {
    let mut given: Vec<(String, String)> = metadata
        .iter()
        .filter(|(k, _)| !k.contains(':'))
        .map(|(k, v)| (k.to_lowercase(), v.clone()))
        .collect();
    if let Some(options) = metadata.get("options") {
        let mut words = options.split_whitespace();
        while let Some(word) = words.next() {
            let pair = match word {
                "-c" => words.next(),
                w => w.strip_prefix("--").or_else(|| w.strip_prefix("-c")),
            };
            if let Some((k, v)) = pair.and_then(|p| p.split_once('=')) {
                given.push((k.to_lowercase().replace('-', "_"), v.to_owned()));
            }
        }
    }
    for (name, value) in given {
        let Some(setting) = pg::find(&name).filter(|s| s.settable) else {
            continue;
        };
        match validate(setting.name, &value) {
            Ok(v) => {
                metadata.insert(startup_key(setting.name), v.clone());
                metadata.insert(setting.name.to_owned(), v);
            }
            Err(e) => {
                tracing::debug!(error = %e, "SQL connection: startup parameter ignored");
                metadata.remove(setting.name);
            }
        }
    }
}

fn show_response(names: &[&str], rows: Vec<Vec<String>>) -> PgWireResult<Response> {
    let fields = Arc::new(
        names
            .iter()
            .map(|n| {
                FieldInfo::new(
                    (*n).to_owned(),
                    None,
                    None,
                    pgwire::api::Type::TEXT,
                    FieldFormat::Text,
                )
            })
            .collect::<Vec<_>>(),
    );
    let mut encoded = Vec::with_capacity(rows.len());
    for row in rows {
        let mut encoder = DataRowEncoder::new(fields.clone());
        for cell in row {
            encoder.encode_field(&Some(cell))?;
        }
        encoded.push(Ok(encoder.take_row()));
    }
    Ok(Response::Query(QueryResponse::new(
        fields,
        futures::stream::iter(encoded),
    )))
}

fn tag(name: &str) -> Response {
    Response::Execution(Tag::new(name))
}

/// Answers a statement of [`Kind::Session`] for `client`.
pub async fn respond<C>(client: &mut C, statement: &Statement) -> Result<Response, PgWireError>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let failed = client.transaction_status() == TransactionStatus::Error;
    let response = match statement {
        Statement::Set(set) => {
            let changes = set_change(set)?;
            for (name, value) in apply(client.metadata_mut(), changes) {
                client
                    .send(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                        name, value,
                    )))
                    .await?;
            }
            tag("SET")
        }
        Statement::Reset(ResetStatement { reset }) => {
            let names: Vec<String> = match reset {
                Reset::ALL => pg::SETTINGS
                    .iter()
                    .filter(|s| s.settable)
                    .map(|s| s.name.to_owned())
                    .collect(),
                Reset::ConfigurationParameter(name) => {
                    let name = name.to_string().replace('"', "").to_lowercase();
                    vec![checked_name(&name, None)?]
                }
            };
            apply(
                client.metadata_mut(),
                names.into_iter().map(|n| (n, None)).collect(),
            );
            tag("RESET")
        }
        Statement::Discard { object_type } => {
            if *object_type == DiscardObject::ALL {
                let names = pg::SETTINGS.iter().filter(|s| s.settable);
                apply(
                    client.metadata_mut(),
                    names.map(|s| (s.name.to_owned(), None)).collect(),
                );
            }
            tag(&format!("DISCARD {object_type}"))
        }
        Statement::ShowVariable { .. } => {
            let name = show_name(statement).unwrap_or_default();
            if name == "all" {
                let rows = pg::SETTINGS
                    .iter()
                    .map(|s| {
                        let scope = if s.settable {
                            "per connection"
                        } else {
                            "server"
                        };
                        vec![
                            s.name.to_owned(),
                            current(client.metadata(), s.name),
                            scope.to_owned(),
                        ]
                    })
                    .collect();
                return show_response(&["name", "setting", "description"], rows);
            }
            let value = match name.as_str() {
                "session_authorization" => client.metadata().get("user").cloned(),
                n => pg::find(n).map(|s| current(client.metadata(), s.name)),
            };
            let Some(value) = value else {
                return Err(SqlError::new(
                    "42704",
                    format!("unrecognized configuration parameter \"{name}\""),
                )
                .into());
            };
            return show_response(&[&name], vec![vec![value]]);
        }
        Statement::Deallocate { .. } => tag("DEALLOCATE"),
        Statement::StartTransaction { modes, .. } => {
            set_change(&Set::SetTransaction {
                modes: modes.clone(),
                snapshot: None,
                session: false,
            })?;
            match client.transaction_status() {
                TransactionStatus::Idle => Response::TransactionStart(Tag::new("BEGIN")),
                _ => tag("BEGIN"),
            }
        }
        Statement::Commit { .. } if failed => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Statement::Commit { .. } => Response::TransactionEnd(Tag::new("COMMIT")),
        // Back to a savepoint after an error: there is nothing to undo in
        // a read-only transaction, and pgwire cannot take a failed
        // transaction back to a running one, so the block ends (the client
        // sees it idle and starts a new one with its next statement).
        Statement::Rollback {
            savepoint: Some(_), ..
        } if failed => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Statement::Rollback {
            savepoint: Some(_), ..
        } => tag("ROLLBACK"),
        Statement::Rollback { .. } => Response::TransactionEnd(Tag::new("ROLLBACK")),
        Statement::Savepoint { .. } => tag("SAVEPOINT"),
        Statement::ReleaseSavepoint { .. } => tag("RELEASE"),
        other => return Err(SqlError::new("0A000", format!("{other} is not supported")).into()),
    };
    Ok(response)
}

impl From<SqlError> for PgWireError {
    fn from(e: SqlError) -> Self {
        if e.code == "25006" {
            // Counted here, where each refused statement passes once.
            metrics::counter!("driftline_sql_refused_total").increment(1);
        }
        PgWireError::UserError(Box::new(pgwire::error::ErrorInfo::new(
            "ERROR".into(),
            e.code.into(),
            e.message,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn set(sql: &str) -> Result<Vec<Change>, SqlError> {
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .expect(sql)
            .remove(0);
        let Statement::Set(s) = statement else {
            panic!("{sql} is not a SET");
        };
        set_change(&s)
    }

    #[test]
    fn engine_settings_are_refused_in_every_spelling() {
        for sql in [
            "SET datafusion.runtime.memory_limit = '1K'",
            "SET \"datafusion\".runtime.memory_limit = '16G'",
            "SET \"datafusion\".\"execution\".\"time_zone\" = '-03:00'",
            "SET DataFusion.Runtime.Temp_Directory = '/tmp/x'",
            "SET SESSION datafusion.execution.batch_size TO 1",
            "SET LOCAL datafusion.execution.batch_size TO 1",
        ] {
            let e = set(sql).expect_err(sql);
            assert_eq!(e.code, "25006", "{sql}: {e}");
        }
        assert_eq!(
            set("SET no_such_thing = 1").expect_err("unknown").code,
            "42704"
        );
        assert_eq!(
            set("SET server_version = '9'").expect_err("fixed").code,
            "55P02"
        );
        assert_eq!(set("SET ROLE postgres").expect_err("role").code, "42501");
        assert_eq!(
            set("SET TRANSACTION READ WRITE").expect_err("rw").code,
            "25006"
        );
    }

    #[test]
    fn postgres_settings_are_checked_and_kept_per_connection() {
        let mut a = HashMap::new();
        let b: HashMap<String, String> = HashMap::new();
        let reported = apply(&mut a, set("SET TIME ZONE '-03:00'").expect("tz"));
        assert_eq!(reported, vec![("TimeZone".to_owned(), "-03:00".to_owned())]);
        apply(
            &mut a,
            set("SET statement_timeout = '5s'").expect("timeout"),
        );
        apply(
            &mut a,
            set("SET search_path TO public, \"$user\"").expect("path"),
        );
        assert_eq!(Session::of(&a).time_zone(), "-03:00");
        assert_eq!(Session::of(&b).time_zone(), "UTC");
        let server = Duration::from_secs(60);
        assert_eq!(
            Session::of(&a).statement_timeout(server),
            Duration::from_secs(5)
        );
        // Raising the limit above the server's does not.
        apply(
            &mut a,
            set("SET statement_timeout = '2h'").expect("timeout"),
        );
        assert_eq!(Session::of(&a).statement_timeout(server), server);
        assert_eq!(current(&a, "search_path"), "public, $user");
        apply(&mut a, set("SET TIME ZONE DEFAULT").expect("default"));
        assert_eq!(Session::of(&a).time_zone(), "UTC");
        for bad in [
            "SET timezone = 'Mars/Olympus'",
            "SET datestyle = 'German'",
            "SET client_encoding = 'LATIN1'",
            "SET statement_timeout = 'soon'",
            "SET extra_float_digits = 9",
        ] {
            assert_eq!(set(bad).expect_err(bad).code, "22023", "{bad}");
        }
        assert_eq!(
            set("SET timezone = 'Europe/Berlin'")
                .expect("named zone")
                .len(),
            1
        );
        assert_eq!(
            set("SET standard_conforming_strings = on")
                .expect("unchanged")
                .len(),
            1
        );
    }

    #[test]
    fn startup_parameters_become_the_connections_own() {
        let mut m: HashMap<String, String> = [
            ("TimeZone", "Europe/Berlin"),
            ("DateStyle", "ISO"),
            ("client_encoding", "UTF8"),
            ("options", "-c statement_timeout=3s --search_path=x"),
            ("extra_float_digits", "99"),
            ("user", "driftline"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        adopt_startup_parameters(&mut m);
        assert_eq!(Session::of(&m).time_zone(), "Europe/Berlin");
        assert_eq!(
            Session::of(&m).statement_timeout(Duration::from_secs(60)),
            Duration::from_secs(3)
        );
        assert_eq!(current(&m, "search_path"), "x");
        assert_eq!(
            current(&m, "extra_float_digits"),
            "1",
            "invalid value dropped"
        );
        // RESET returns to the startup value, not the server's.
        apply(&mut m, vec![("timezone".into(), Some("UTC".into()))]);
        apply(&mut m, vec![("timezone".into(), None)]);
        assert_eq!(Session::of(&m).time_zone(), "Europe/Berlin");
    }

    #[test]
    fn durations_parse_as_postgres_writes_them() {
        assert_eq!(parse_duration("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1min"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("1 fortnight").is_err());
    }
}
