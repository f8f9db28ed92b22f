//! A detector's SQL for one period: its placeholders filled in, and its
//! `FROM metrics` reading each device's capped weight.

use super::*;

/// Default `device_cap`: a device weighs at most 10 median devices.
pub const DEFAULT_DEVICE_CAP: f64 = 10.0;

/// Each device's weight in the reference and current periods of `p`
/// (`in_current` tells which): columns `device_id`, `model_id`,
/// `model_version`, `in_current`, `device_weight`. A device's inferences
/// in a period (noised, so floored at 0) above `cap` times the median
/// device's are scaled down to that; nobody is capped below one inference.
pub(super) fn device_weights(p: &Periods, cap: f64) -> String {
    format!(
        "SELECT device_id, model_id, model_version, in_current, \
                CASE WHEN n > limit_n THEN limit_n / n ELSE 1.0 END AS device_weight \
         FROM (SELECT device_id, model_id, model_version, in_current, n, \
                      {cap:?} * greatest(median(n) OVER (PARTITION BY model_id, model_version, in_current), 1.0) AS limit_n \
               FROM (SELECT device_id, model_id, model_version, window_start >= {cur} AS in_current, \
                            CAST(greatest(sum(inference_count), 0) AS DOUBLE) AS n \
                     FROM metrics WHERE window_start >= {start} AND window_start < {end} \
                     GROUP BY device_id, model_id, model_version, window_start >= {cur}))",
        cur = literal(p.current_start),
        start = literal(p.reference_start),
        end = literal(p.current_end),
    )
}

/// Where a detector's `FROM metrics` finds each device's weight.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// Computed within the statement: self-contained SQL, as
    /// `detect --print-sql` shows it.
    Inline,
    /// A table holding [`device_weights`]'s rows, computed beforehand (one
    /// scan of `metrics` serves the statement and `devices_capped`).
    Table(&'a str),
}

/// The rows of `metrics` in the periods of `p`, each with its device's
/// `device_weight`: what a detector's `FROM metrics` reads.
fn weighted_metrics(p: &Periods, cap: f64, weights: Weights<'_>) -> String {
    let weights = match weights {
        Weights::Inline => format!("({})", device_weights(p, cap)),
        Weights::Table(name) => name.to_owned(),
    };
    format!(
        "(SELECT m.*, w.device_weight FROM {weights} w JOIN metrics m \
          ON m.device_id = w.device_id AND m.model_id = w.model_id \
             AND m.model_version = w.model_version \
             AND (m.window_start >= {cur}) = w.in_current \
          WHERE m.window_start >= {start} AND m.window_start < {end}) AS metrics",
        cur = literal(p.current_start),
        start = literal(p.reference_start),
        end = literal(p.current_end),
    )
}

/// Whether `detector`'s sums are weighted: it reads `FROM metrics` and its
/// `device_cap` is not 0.
pub(super) fn is_weighted(detector: &Detector) -> bool {
    detector.device_cap != 0.0 && find_from_metrics(&detector.body).next().is_some()
}

/// Where `body` says `FROM metrics` (any case and spacing): the byte range
/// of each.
fn find_from_metrics(body: &str) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let lower = body.to_ascii_lowercase();
    let mut found = Vec::new();
    let mut search = 0;
    while let Some(at) = lower[search..].find("from").map(|i| i + search) {
        search = at + 4;
        let before_ok = at == 0 || !is_word(lower.as_bytes()[at - 1]);
        let after = &lower[at + 4..];
        let spaces = after.len() - after.trim_start().len();
        let table = &after[spaces..];
        let ends = table
            .as_bytes()
            .get("metrics".len())
            .is_none_or(|b| !is_word(*b));
        if before_ok && spaces > 0 && table.starts_with("metrics") && ends {
            let end = at + 4 + spaces + "metrics".len();
            found.push(at..end);
            search = end;
        }
    }
    found.into_iter()
}

/// `detector`'s body with each `FROM metrics` reading
/// [`weighted_metrics`], if [`is_weighted`].
fn weigh_metrics(detector: &Detector, p: &Periods, weights: Weights<'_>) -> String {
    let body = &detector.body;
    if !is_weighted(detector) {
        return body.clone();
    }
    let mut out = String::with_capacity(body.len());
    let mut rest = 0;
    for range in find_from_metrics(body) {
        out.push_str(&body[rest..range.start]);
        out.push_str("FROM ");
        out.push_str(&weighted_metrics(p, detector.device_cap, weights));
        rest = range.end;
    }
    out.push_str(&body[rest..]);
    out
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn literal(t: DateTime<Utc>) -> String {
    format!("TIMESTAMP '{}'", t.format("%Y-%m-%dT%H:%M:%SZ"))
}

/// The noise scale of a noised field: its `scale_*` column, or for
/// `categories.{name}` and `custom.{name}` its entry in `noise_scale`.
fn scale_of(field: &str) -> String {
    match field {
        "feedback_positive" | "feedback_negative" | "feedback_correction" => {
            "scale_feedback".into()
        }
        f if f.starts_with("categories.") || f.starts_with("custom.") => {
            format!("json_number(noise_scale, '{}')", f.replace('\'', "''"))
        }
        other => format!("scale_{other}"),
    }
}

/// Replaces every `{open}FIELD}` placeholder of `sql` (`open` such as
/// `{cur_sum:`) with `expand(FIELD)`; an unclosed one is left as it is.
fn replace_fields(sql: &mut String, open: &str, expand: impl Fn(&str) -> String) {
    while let Some(start) = sql.find(open) {
        let Some(len) = sql[start..].find('}') else {
            break;
        };
        let expanded = expand(&sql[start + open.len()..start + len]);
        sql.replace_range(start..=start + len, &expanded);
    }
}

/// The detector's SQL for `p`. Placeholders:
/// - `{reference_start}`, `{current_start}`, `{current_end}`: timestamps;
///   `{threshold}`, `{alpha}`, `{min_devices}`: the header's values;
/// - `{in_reference}`, `{in_current}`: conditions on `window_start`;
/// - `{ref_hist:h}`, `{cur_hist:h}`: histogram `h` (latency_ms,
///   confidence, input_tokens, output_tokens) summed over the period, as
///   a list of bucket counts (one pass over the flat bucket columns);
/// - `{ref_sum:c}`, `{cur_sum:c}`: noised count `c` summed over the period;
/// - `{ref_noise:f}`, `{cur_noise:f}`: the noise variance of such a sum (of
///   each bucket, for a histogram).
///
/// Sums are weighted by `device_weight` where the body reads `FROM metrics`
/// (see the module's "Robust fleet sums"), the weights found as `weights`
/// says.
pub fn render(detector: &Detector, p: &Periods, weights: Weights<'_>) -> String {
    let body = weigh_metrics(detector, p, weights);
    let (w, w2) = if is_weighted(detector) {
        (" * device_weight", " * device_weight * device_weight")
    } else {
        ("", "")
    };
    let in_reference = format!(
        "(window_start >= {} AND window_start < {})",
        literal(p.reference_start),
        literal(p.current_start)
    );
    let in_current = format!(
        "(window_start >= {} AND window_start < {})",
        literal(p.current_start),
        literal(p.current_end)
    );
    let mut sql = body;
    for (tag, cond) in [("ref", &in_reference), ("cur", &in_current)] {
        for h in crate::lake::schema::HISTOGRAMS {
            let buckets: Vec<String> = (0..MAX_BUCKETS)
                .map(|i| format!("sum(CASE WHEN {cond} THEN {h}_b{i:02}{w} END)"))
                .collect();
            sql = sql.replace(
                &format!("{{{tag}_hist:{h}}}"),
                &format!("make_array({})", buckets.join(", ")),
            );
        }
        // Counts and noise of any field named in the file.
        replace_fields(&mut sql, &format!("{{{tag}_sum:"), |field| {
            format!("sum(CASE WHEN {cond} THEN {field}{w} ELSE 0 END)")
        });
        replace_fields(&mut sql, &format!("{{{tag}_noise:"), |field| {
            format!(
                "sum(CASE WHEN {cond} THEN noise_var(mechanism, {}){w2} ELSE 0 END)",
                scale_of(field)
            )
        });
    }
    sql.replace("{in_reference}", &in_reference)
        .replace("{in_current}", &in_current)
        .replace("{reference_start}", &literal(p.reference_start))
        .replace("{current_start}", &literal(p.current_start))
        .replace("{current_end}", &literal(p.current_end))
        .replace("{threshold}", &format!("{:?}", detector.threshold))
        .replace("{alpha}", &format!("{:?}", detector.alpha))
        .replace("{min_devices}", &detector.min_devices.to_string())
}
