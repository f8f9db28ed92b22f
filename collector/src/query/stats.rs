//! Statistics over noised counts, as SQL functions, for analysts, views and
//! detectors.
//!
//! Every noised count in the lake is its true value plus independent,
//! zero-mean noise of known scale (`scale_*` columns, `mechanism`). So a
//! fleet sum is unbiased, and its noise variance is the sum of each row's
//! [`noise_var`]; a standard error is the square root of that sum.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayAccessor, Float64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::cast::{as_float64_array, as_string_array};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, ScalarUDF, SimpleScalarUDF, TypeSignature, Volatility,
};

/// Variance of one noise draw: discrete Laplace of scale `b` has
/// `2q/(1-q)^2` with `q = e^(-1/b)` (docs/privacy.md); discrete Gaussian of
/// scale `sigma` has (very nearly) `sigma^2`; no mechanism, no noise.
pub fn noise_var(mechanism: &str, scale: f64) -> f64 {
    if !scale.is_finite() || scale <= 0.0 {
        return 0.0;
    }
    match mechanism {
        "laplace" => {
            let q = (-1.0 / scale).exp();
            2.0 * q / ((1.0 - q) * (1.0 - q))
        }
        "gaussian" => scale * scale,
        _ => 0.0,
    }
}

/// `noise_var(mechanism, scale)` in SQL; NULL scale gives 0.
///
/// It runs once per row in every detector, so it takes the text column as
/// stored (`Utf8View` or `Utf8`, no conversion) and reuses the previous
/// row's answer when mechanism and scale repeat, as they do along a
/// device's rows (one `exp` per change instead of one per row).
pub fn noise_var_udf() -> ScalarUDF {
    let signature = Signature::one_of(
        json::TEXT_TYPES
            .into_iter()
            .map(|text| TypeSignature::Exact(vec![text, DataType::Float64]))
            .collect(),
        Volatility::Immutable,
    );
    ScalarUDF::from(SimpleScalarUDF::new_with_signature(
        "noise_var",
        signature,
        DataType::Float64,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let scales = as_float64_array(&arrays[1])?;
            let out = match arrays[0].data_type() {
                DataType::Utf8View => noise_vars(arrays[0].as_string_view(), scales),
                DataType::LargeUtf8 => noise_vars(arrays[0].as_string::<i64>(), scales),
                _ => noise_vars(as_string_array(&arrays[0])?, scales),
            };
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    ))
}

/// [`noise_var`] of each row (0 where either input is NULL).
fn noise_vars<'a>(
    mechanisms: impl ArrayAccessor<Item = &'a str>,
    scales: &Float64Array,
) -> Float64Array {
    let mut last: Option<(&str, f64, f64)> = None;
    (0..mechanisms.len())
        .map(|i| {
            if mechanisms.is_null(i) || scales.is_null(i) {
                return Some(0.0);
            }
            let (mechanism, scale) = (mechanisms.value(i), scales.value(i));
            match last {
                Some((m, s, v)) if m == mechanism && s.to_bits() == scale.to_bits() => Some(v),
                _ => {
                    let v = noise_var(mechanism, scale);
                    last = Some((mechanism, scale, v));
                    Some(v)
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variances_match_the_mechanisms() {
        // Large b: discrete Laplace approaches the continuous 2 b^2.
        let v = noise_var("laplace", 50.0);
        assert!((v / (2.0 * 50.0 * 50.0) - 1.0).abs() < 1e-3, "{v}");
        // b = 1: q = e^-1, 2q/(1-q)^2 = 1.8407...
        assert!((noise_var("laplace", 1.0) - 1.840_7).abs() < 1e-3);
        assert_eq!(noise_var("gaussian", 3.0), 9.0);
        assert_eq!(noise_var("none", 3.0), 0.0);
        assert_eq!(noise_var("laplace", 0.0), 0.0);
    }

    /// Repeated rows reuse the previous answer; a change of mechanism or
    /// scale, and NULLs, are still seen row by row, in both text types.
    #[test]
    fn column_variances_follow_every_row() {
        use datafusion::arrow::array::{StringArray, StringViewArray};
        let mechanisms = [
            Some("laplace"),
            Some("laplace"),
            Some("gaussian"),
            Some("gaussian"),
            None,
            Some("laplace"),
            Some("none"),
        ];
        let scales = Float64Array::from(vec![
            Some(1.0),
            Some(1.0),
            Some(1.0),
            Some(3.0),
            Some(3.0),
            None,
            Some(2.0),
        ]);
        let expected: Vec<f64> = mechanisms
            .iter()
            .zip(scales.iter())
            .map(|(m, s)| match (m, s) {
                (Some(m), Some(s)) => noise_var(m, s),
                _ => 0.0,
            })
            .collect();
        assert_eq!(expected[2], 1.0);
        assert_eq!(expected[3], 9.0);
        let views = StringViewArray::from(mechanisms.to_vec());
        let plain = StringArray::from(mechanisms.to_vec());
        for out in [noise_vars(&views, &scales), noise_vars(&plain, &scales)] {
            assert_eq!(out.values().to_vec(), expected);
        }
    }
}

// ---- Histogram and rate statistics -------------------------------------
//
// Fleet histograms are sums of noised bucket counts: each bucket carries
// sampling variation (the events themselves) and noise of known variance
// (the same for every bucket of a field: `noise`, the sum of the rows'
// `noise_var`). The functions below take both into account, so a
// threshold on their p-values holds its false-alarm rate whatever epsilon
// and fleet size are.

use datafusion::arrow::array::{ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::Field;
use datafusion::error::Result;
use datafusion::logical_expr::{ScalarFunctionArgs, ScalarUDFImpl, Signature};
use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};

/// Noisy counts clamped at zero (a negative count is noise around 0).
fn clamp(counts: &[f64]) -> Vec<f64> {
    counts.iter().map(|c| c.max(0.0)).collect()
}

/// Population stability index between two histograms (clamped, with a
/// small floor so empty buckets do not blow up).
pub fn psi(reference: &[f64], current: &[f64]) -> Option<f64> {
    let (r, c) = (clamp(reference), clamp(current));
    let (nr, nc): (f64, f64) = (r.iter().sum(), c.iter().sum());
    if nr <= 0.0 || nc <= 0.0 || r.len() != c.len() {
        return None;
    }
    let floor = 1e-4;
    Some(
        r.iter()
            .zip(&c)
            .map(|(r, c)| {
                let (p, q) = ((r / nr).max(floor), (c / nc).max(floor));
                (q - p) * (q / p).ln()
            })
            .sum(),
    )
}

/// Jensen-Shannon distance (base 2, in [0, 1]) between two histograms.
pub fn js_distance(reference: &[f64], current: &[f64]) -> Option<f64> {
    let (r, c) = (clamp(reference), clamp(current));
    let (nr, nc): (f64, f64) = (r.iter().sum(), c.iter().sum());
    if nr <= 0.0 || nc <= 0.0 || r.len() != c.len() {
        return None;
    }
    let kl = |a: f64, m: f64| if a > 0.0 { a * (a / m).log2() } else { 0.0 };
    let js: f64 = r
        .iter()
        .zip(&c)
        .map(|(r, c)| {
            let (p, q) = (r / nr, c / nc);
            let m = (p + q) / 2.0;
            0.5 * kl(p, m) + 0.5 * kl(q, m)
        })
        .sum();
    Some(js.max(0.0).sqrt())
}

/// p-value of "both histograms come from the same distribution": Pearson's
/// chi-square test of homogeneity whose bucket variances also include the
/// noise (`noise_ref`, `noise_cur`: noise variance of each bucket's sum).
pub fn hist_shift_pvalue(
    reference: &[f64],
    current: &[f64],
    noise_ref: f64,
    noise_cur: f64,
) -> Option<f64> {
    let (r, c) = (clamp(reference), clamp(current));
    let (nr, nc): (f64, f64) = (r.iter().sum(), c.iter().sum());
    if nr <= 0.0 || nc <= 0.0 || r.len() != c.len() {
        return None;
    }
    let mut x2 = 0.0;
    let mut used = 0u32;
    for (rk, ck) in r.iter().zip(&c) {
        let pooled = (rk + ck) / (nr + nc);
        let var = pooled * (1.0 / nr + 1.0 / nc) + noise_ref / (nr * nr) + noise_cur / (nc * nc);
        if var > 0.0 {
            let d = ck / nc - rk / nr;
            x2 += d * d / var;
            used += 1;
        }
    }
    if used < 2 {
        return None;
    }
    let chi = ChiSquared::new(f64::from(used - 1)).ok()?;
    Some(1.0 - chi.cdf(x2))
}

/// Midpoints of the buckets defined by `edges`.
fn mids(edges: &[f64], n: usize) -> Vec<f64> {
    (0..n)
        .map(|k| match (edges.get(k), edges.get(k + 1)) {
            (Some(a), Some(b)) => (a + b) / 2.0,
            (Some(a), None) => *a,
            _ => 0.0,
        })
        .collect()
}

/// Mean of the values a histogram counts (bucket midpoints).
pub fn hist_mean(edges: &[f64], counts: &[f64]) -> Option<f64> {
    let c = clamp(counts);
    let n: f64 = c.iter().sum();
    if n <= 0.0 {
        return None;
    }
    let m = mids(edges, c.len());
    Some(c.iter().zip(&m).map(|(c, m)| c * m).sum::<f64>() / n)
}

/// Standard error of [`hist_mean`]: the events' spread over their number,
/// plus the bucket noise (`noise`: variance of each bucket's sum).
pub fn hist_mean_se(edges: &[f64], counts: &[f64], noise: f64) -> Option<f64> {
    let mean = hist_mean(edges, counts)?;
    let c = clamp(counts);
    let n: f64 = c.iter().sum();
    let m = mids(edges, c.len());
    let spread: f64 = c
        .iter()
        .zip(&m)
        .map(|(c, m)| c * (m - mean).powi(2))
        .sum::<f64>()
        / n;
    let noise_part: f64 = m.iter().map(|m| (m - mean).powi(2)).sum::<f64>() * noise / (n * n);
    Some((spread / n + noise_part).sqrt())
}

/// Where the `q` quantile of a histogram falls: (bucket, fraction of the
/// bucket below it), on the raw noisy counts (clamping would bias them).
fn quantile_position(counts: &[f64], q: f64) -> Option<(usize, f64)> {
    let n: f64 = counts.iter().sum();
    if n <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let target = q * n;
    let mut below = 0.0;
    for (k, ck) in counts.iter().enumerate() {
        if *ck > 0.0 && below + ck >= target {
            return Some((k, ((target - below) / ck).clamp(0.0, 1.0)));
        }
        below += ck;
    }
    None
}

/// The `q` quantile of a histogram, linear within its bucket.
pub fn hist_quantile(edges: &[f64], counts: &[f64], q: f64) -> Option<f64> {
    let (k, frac) = quantile_position(counts, q)?;
    let (a, b) = (*edges.get(k)?, *edges.get(k + 1)?);
    Some(a + (b - a) * frac)
}

/// Standard error of [`hist_quantile`]: the uncertainty of the cumulative
/// share at the quantile (events: `q(1-q)/N`; noise: the buckets summed up
/// to it, `noise` each) divided by the density there.
pub fn hist_quantile_se(edges: &[f64], counts: &[f64], q: f64, noise: f64) -> Option<f64> {
    let (k, frac) = quantile_position(counts, q)?;
    let n: f64 = counts.iter().sum();
    let width = edges.get(k + 1)? - edges.get(k)?;
    let density = counts[k] / (n * width);
    if density <= 0.0 || width <= 0.0 {
        return None;
    }
    let buckets = counts.len() as f64;
    let share_var = q * (1.0 - q) / n
        + (k as f64 + frac * frac) * noise / (n * n)
        + q * q * buckets * noise / (n * n);
    Some(share_var.sqrt() / density)
}

/// z of "the current rate x/n is higher than the reference one", with
/// binomial sampling variance and the noise variance of each x and n.
#[allow(clippy::too_many_arguments)]
pub fn rate_z(
    x_ref: f64,
    n_ref: f64,
    vx_ref: f64,
    vn_ref: f64,
    x_cur: f64,
    n_cur: f64,
    vx_cur: f64,
    vn_cur: f64,
) -> Option<f64> {
    if n_ref <= 0.0 || n_cur <= 0.0 {
        return None;
    }
    let var = |x: f64, n: f64, vx: f64, vn: f64| {
        let r = (x / n).clamp(0.0, 1.0);
        r * (1.0 - r) / n + (vx + r * r * vn) / (n * n)
    };
    let total = var(x_ref, n_ref, vx_ref, vn_ref) + var(x_cur, n_cur, vx_cur, vn_cur);
    if total <= 0.0 {
        return None;
    }
    Some((x_cur / n_cur - x_ref / n_ref) / total.sqrt())
}

/// P(Z > z) for a standard normal Z.
pub fn normal_sf(z: f64) -> Option<f64> {
    Normal::new(0.0, 1.0).ok().map(|n| 1.0 - n.cdf(z))
}

/// A SQL function over float scalars and float lists, row by row.
#[derive(Debug)]
struct RowFn {
    name: &'static str,
    signature: Signature,
    f: fn(&[Vec<f64>]) -> Option<f64>,
}

impl PartialEq for RowFn {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for RowFn {}
impl std::hash::Hash for RowFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

/// One argument of one row as floats: a list's elements (NULL elements as
/// 0: a bucket past a histogram's end), or a scalar as a one-element list.
fn row_values(array: &ArrayRef, row: usize) -> Result<Option<Vec<f64>>> {
    if array.is_null(row) {
        return Ok(None);
    }
    let values = match array.data_type() {
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => {
            let list_type =
                DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true)));
            let list = cast(array, &list_type)?;
            let list = list.as_list::<i32>();
            let inner = list.value(row);
            let floats = as_float64_array(&inner)?;
            floats.iter().map(|v| v.unwrap_or(0.0)).collect()
        }
        _ => {
            let one = cast(&array.slice(row, 1), &DataType::Float64)?;
            vec![as_float64_array(&one)?.value(0)]
        }
    };
    Ok(Some(values))
}

impl ScalarUDFImpl for RowFn {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| a.to_array(rows))
            .collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(rows);
        for row in 0..rows {
            let mut values = Vec::with_capacity(arrays.len());
            for a in &arrays {
                match row_values(a, row)? {
                    Some(v) => values.push(v),
                    None => break,
                }
            }
            out.push(if values.len() == arrays.len() {
                (self.f)(&values).filter(|v| v.is_finite())
            } else {
                None
            });
        }
        Ok(ColumnarValue::Array(Arc::new(Float64Array::from(out))))
    }
}

fn row_fn(name: &'static str, arity: usize, f: fn(&[Vec<f64>]) -> Option<f64>) -> ScalarUDF {
    ScalarUDF::new_from_impl(RowFn {
        name,
        signature: Signature::any(arity, Volatility::Immutable),
        f,
    })
}

fn scalar(v: &[f64]) -> f64 {
    v.first().copied().unwrap_or(f64::NAN)
}

/// Every statistics function, for registration in a session.
pub fn udfs() -> Vec<ScalarUDF> {
    vec![
        noise_var_udf(),
        row_fn("psi", 2, |a| psi(&a[0], &a[1])),
        row_fn("js_distance", 2, |a| js_distance(&a[0], &a[1])),
        row_fn("hist_shift_pvalue", 4, |a| {
            hist_shift_pvalue(&a[0], &a[1], scalar(&a[2]), scalar(&a[3]))
        }),
        row_fn("hist_mean", 2, |a| hist_mean(&a[0], &a[1])),
        row_fn("hist_mean_se", 3, |a| {
            hist_mean_se(&a[0], &a[1], scalar(&a[2]))
        }),
        row_fn("hist_quantile", 3, |a| {
            hist_quantile(&a[0], &a[1], scalar(&a[2]))
        }),
        row_fn("hist_quantile_se", 4, |a| {
            hist_quantile_se(&a[0], &a[1], scalar(&a[2]), scalar(&a[3]))
        }),
        row_fn("rate_z", 8, |a| {
            rate_z(
                scalar(&a[0]),
                scalar(&a[1]),
                scalar(&a[2]),
                scalar(&a[3]),
                scalar(&a[4]),
                scalar(&a[5]),
                scalar(&a[6]),
                scalar(&a[7]),
            )
        }),
        row_fn("normal_sf", 1, |a| normal_sf(scalar(&a[0]))),
    ]
}

/// Checks the documented behaviour of each function, including the
/// calibration of the noise-aware tests by simulation.
#[cfg(test)]
mod calibration {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal as Gauss};

    /// A fleet histogram: `devices` devices with `events` events each from
    /// `probs`, each device's bucket counts noised with variance `noise`.
    fn fleet(
        rng: &mut rand_chacha::ChaCha8Rng,
        probs: &[f64],
        devices: usize,
        events: usize,
        noise: f64,
    ) -> Vec<f64> {
        let mut h = vec![0.0; probs.len()];
        let gauss = Gauss::new(0.0, noise.sqrt()).expect("normal");
        for _ in 0..devices {
            for _ in 0..events {
                let mut u: f64 = rng.random();
                for (k, p) in probs.iter().enumerate() {
                    if u < *p || k == probs.len() - 1 {
                        h[k] += 1.0;
                        break;
                    }
                    u -= p;
                }
            }
            for b in h.iter_mut() {
                *b += gauss.sample(rng);
            }
        }
        h
    }

    #[test]
    fn histogram_shift_test_holds_its_false_alarm_rate_under_noise() {
        let probs = [0.1, 0.2, 0.3, 0.25, 0.1, 0.05];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let alpha = 0.01;
        // Small and large fleets, weak and strong privacy (noise variance
        // per device and bucket: 2 b^2 with b = 2/epsilon).
        for (devices, epsilon) in [(20, 1.0), (200, 0.5), (100, 4.0)] {
            let b: f64 = 2.0 / epsilon;
            let noise = 2.0 * b * b;
            let trials = 400;
            let mut alarms = 0;
            for _ in 0..trials {
                let r = fleet(&mut rng, &probs, devices, 20, noise);
                let c = fleet(&mut rng, &probs, devices, 20, noise);
                let v = noise * devices as f64;
                if hist_shift_pvalue(&r, &c, v, v).is_some_and(|p| p < alpha) {
                    alarms += 1;
                }
            }
            // Binomial(400, 0.01): mean 4, 12 is > 4 standard deviations.
            assert!(
                alarms <= 12,
                "{alarms} false alarms of {trials} ({devices} devices, eps {epsilon})"
            );
            // Ignoring the noise would alarm far more often.
            if epsilon < 1.5 {
                let mut naive = 0;
                for _ in 0..100 {
                    let r = fleet(&mut rng, &probs, devices, 20, noise);
                    let c = fleet(&mut rng, &probs, devices, 20, noise);
                    if hist_shift_pvalue(&r, &c, 0.0, 0.0).is_some_and(|p| p < alpha) {
                        naive += 1;
                    }
                }
                assert!(naive > 20, "without the noise term: {naive} alarms of 100");
            }
        }
    }

    #[test]
    fn histogram_shift_test_detects_a_real_shift() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let before = [0.1, 0.2, 0.3, 0.25, 0.1, 0.05];
        let after = [0.05, 0.1, 0.25, 0.3, 0.2, 0.1];
        let noise = 2.0 * 2.0 * 2.0; // epsilon 1
        let r = fleet(&mut rng, &before, 200, 20, noise);
        let c = fleet(&mut rng, &after, 200, 20, noise);
        let v = noise * 200.0;
        let p = hist_shift_pvalue(&r, &c, v, v).expect("p");
        assert!(p < 1e-6, "p = {p}");
        assert!(psi(&r, &c).expect("psi") > 0.1);
        let js = js_distance(&r, &c).expect("js");
        assert!(js > 0.1 && js < 1.0, "{js}");
    }

    #[test]
    fn rate_z_holds_its_false_alarm_rate_under_noise() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let gauss = Gauss::new(0.0, 1.0).expect("normal");
        let (devices, events, rate) = (50usize, 30usize, 0.05);
        let b: f64 = 2.0; // epsilon 1 on a count of sensitivity 2
        let v = 2.0 * b * b;
        let fleet = |rng: &mut rand_chacha::ChaCha8Rng| {
            let (mut x, mut n) = (0.0, 0.0);
            for _ in 0..devices {
                let errors = (0..events).filter(|_| rng.random_bool(rate)).count() as f64;
                x += errors + gauss.sample(rng) * v.sqrt();
                n += events as f64 + gauss.sample(rng) * v.sqrt();
            }
            (x, n)
        };
        let d = devices as f64;
        let trials = 1000;
        let mut alarms = 0;
        for _ in 0..trials {
            let (xr, nr) = fleet(&mut rng);
            let (xc, nc) = fleet(&mut rng);
            let z = rate_z(xr, nr, v * d, v * d, xc, nc, v * d, v * d).expect("z");
            if normal_sf(z).is_some_and(|p| p < 0.01) {
                alarms += 1;
            }
        }
        // Binomial(1000, 0.01): mean 10, sd 3.1.
        assert!(alarms <= 25, "{alarms} false alarms of {trials}");
    }

    #[test]
    fn histogram_mean_and_quantiles() {
        let edges = [0.0, 10.0, 20.0, 40.0];
        let counts = [10.0, 20.0, -3.0];
        assert_eq!(
            hist_mean(&edges, &counts),
            Some((10.0 * 5.0 + 20.0 * 15.0) / 30.0)
        );
        // Raw counts: the -3 counts (noise), so N = 27 and the median is
        // 13.5 of 27, in bucket 1: 10 + 10 * 3.5 / 20.
        assert_eq!(hist_quantile(&edges, &counts, 0.5), Some(11.75));
        let se0 = hist_quantile_se(&edges, &counts, 0.5, 0.0).expect("se");
        let se1 = hist_quantile_se(&edges, &counts, 0.5, 50.0).expect("se");
        assert!(se0 > 0.0 && se1 > se0, "{se0} {se1}");
        assert!(hist_mean_se(&edges, &counts, 0.0).expect("se") > 0.0);
        let noisy = hist_mean_se(&edges, &counts, 100.0).expect("se");
        assert!(noisy > hist_mean_se(&edges, &counts, 0.0).expect("se"));
        assert_eq!(hist_mean(&edges, &[0.0, -1.0, 0.0]), None);
    }
}

// ---- Label counts ------------------------------------------------------
//
// Categorical fields (`categories`, e.g. predicted labels) are stored as
// JSON text: {"label": {"billing": 21, "cancel": 9}}. `category_sum` adds
// one field's counts over rows into a JSON object; the `*_counts`
// functions compare two such objects over the union of their keys.

use super::json::{self, texts_signature, Histograms, Texts};
use datafusion::logical_expr::{Accumulator, AggregateUDF, SimpleAggregateUDF};
use datafusion::scalar::ScalarValue;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Adds `n` to `key`'s sum, copying the key only the first time.
fn add_to(sums: &mut BTreeMap<String, f64>, key: Cow<str>, n: f64) {
    match sums.get_mut(key.as_ref()) {
        Some(sum) => *sum += n,
        None => {
            sums.insert(key.into_owned(), n);
        }
    }
}

/// An aggregate over text arguments as stored; its state is one JSON text.
fn text_udaf(name: &str, arity: usize, accumulator: fn() -> Box<dyn Accumulator>) -> AggregateUDF {
    AggregateUDF::from(SimpleAggregateUDF::new_with_signature(
        name,
        texts_signature(arity),
        DataType::Utf8,
        Arc::new(move |_| Ok(accumulator())),
        vec![Arc::new(Field::new("0", DataType::Utf8, true))],
    ))
}

/// Sums the counts of one categorical field over rows.
#[derive(Debug, Default)]
struct CategorySum {
    counts: BTreeMap<String, f64>,
}

impl CategorySum {
    /// Adds the counts of each row of `texts` (of its `field`, or the
    /// whole object when `fields` is None). Rows that are not JSON objects
    /// add nothing.
    fn add(&mut self, texts: &ArrayRef, fields: Option<&ArrayRef>) -> Result<()> {
        let texts = Texts::new(texts.as_ref())?;
        let fields = fields.map(|f| Texts::new(f.as_ref())).transpose()?;
        let mut counts = Vec::new();
        for i in 0..texts.len() {
            let field = match &fields {
                Some(fields) => match fields.get(i) {
                    Some(field) => Some(field),
                    None => continue,
                },
                None => None,
            };
            if let Some(text) = texts.get(i) {
                json::numbers(text, field, &mut counts);
                for (key, n) in counts.drain(..) {
                    add_to(&mut self.counts, key, n);
                }
            }
        }
        Ok(())
    }
}

impl Accumulator for CategorySum {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.add(&values[0], Some(&values[1]))
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.add(&states[0], None)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Utf8(serde_json::to_string(&self.counts).ok()))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.counts.keys().map(|k| k.len() + 32).sum::<usize>()
    }
}

/// `category_sum(categories, 'label')`: the field's counts summed, as JSON.
pub fn category_sum_udaf() -> AggregateUDF {
    text_udaf("category_sum", 2, || Box::<CategorySum>::default())
}

/// Two JSON count objects as aligned vectors over the union of their keys.
fn aligned(reference: &str, current: &str) -> Option<(Vec<f64>, Vec<f64>)> {
    let parse = |t: &str| serde_json::from_str::<BTreeMap<String, f64>>(t).ok();
    let (r, c) = (parse(reference)?, parse(current)?);
    let keys: std::collections::BTreeSet<&String> = r.keys().chain(c.keys()).collect();
    Some((
        keys.iter()
            .map(|k| r.get(*k).copied().unwrap_or(0.0))
            .collect(),
        keys.iter()
            .map(|k| c.get(*k).copied().unwrap_or(0.0))
            .collect(),
    ))
}

/// A statistic of two aligned count vectors and extra float arguments.
type CountsStatistic = fn(&[f64], &[f64], &[f64]) -> Option<f64>;

/// A SQL function over two JSON count objects (and optional floats).
fn counts_fn(name: &'static str, arity: usize, f: CountsStatistic) -> ScalarUDF {
    let mut types = vec![DataType::Utf8, DataType::Utf8];
    types.resize(arity, DataType::Float64);
    create_udf(
        name,
        types,
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let (r, c) = (as_string_array(&arrays[0])?, as_string_array(&arrays[1])?);
            let extra: Vec<&Float64Array> = arrays[2..]
                .iter()
                .map(|a| as_float64_array(a))
                .collect::<Result<_>>()?;
            let out: Float64Array = (0..r.len())
                .map(|i| {
                    if r.is_null(i) || c.is_null(i) || extra.iter().any(|e| e.is_null(i)) {
                        return None;
                    }
                    let (rv, cv) = aligned(r.value(i), c.value(i))?;
                    let x: Vec<f64> = extra.iter().map(|e| e.value(i)).collect();
                    f(&rv, &cv, &x).filter(|v| v.is_finite())
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// `json_number(json, key)`: a number from a JSON object (e.g. a noise
/// scale from `noise_scale`), NULL when absent.
///
/// The label detector calls it on every row; a row whose text and key are
/// those of the row before reuses its answer (rows of devices sharing a
/// privacy configuration carry the same `noise_scale` text).
fn json_number_udf() -> ScalarUDF {
    ScalarUDF::from(SimpleScalarUDF::new_with_signature(
        "json_number",
        texts_signature(2),
        DataType::Float64,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let (texts, keys) = (
                Texts::new(arrays[0].as_ref())?,
                Texts::new(arrays[1].as_ref())?,
            );
            let mut last: Option<(&str, &str, Option<f64>)> = None;
            let out: Float64Array = (0..texts.len())
                .map(|i| {
                    let (text, key) = (texts.get(i)?, keys.get(i)?);
                    match last {
                        Some((t, k, n)) if t == text && k == key => n,
                        _ => {
                            let n = json::number(text, key);
                            last = Some((text, key, n));
                            n
                        }
                    }
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    ))
}

/// The label-count functions.
pub fn count_udfs() -> Vec<ScalarUDF> {
    vec![
        counts_fn("psi_counts", 2, |r, c, _| psi(r, c)),
        counts_fn("js_distance_counts", 2, |r, c, _| js_distance(r, c)),
        counts_fn("counts_shift_pvalue", 4, |r, c, x| {
            hist_shift_pvalue(r, c, x[0], x[1])
        }),
        json_number_udf(),
    ]
}

// ---- Custom features ---------------------------------------------------
//
// An app's own numeric features arrive as histograms in the `custom` JSON
// column: {"image_brightness": {"edges": [...], "counts": [...]}}.
// `custom_sum(custom)` adds every feature's counts over rows (keeping the
// first edges seen); `custom_noise(mechanism, noise_scale)` sums each
// feature's per-bucket noise variance; `custom_features(ref, cur)` lists the
// features present in both (for `unnest`); `custom_psi` and
// `custom_shift_pvalue` compare one feature.

/// Per feature: edges and summed counts.
#[derive(Debug, Default)]
struct CustomSum {
    features: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
}

impl CustomSum {
    /// Adds every feature's counts of one row's histograms.
    fn add(&mut self, histograms: &Histograms) {
        for (name, edges, counts) in histograms.iter() {
            let entry = match self.features.get_mut(name) {
                Some(entry) => entry,
                None => self
                    .features
                    .entry(name.to_owned())
                    .or_insert_with(|| (edges.to_vec(), vec![])),
            };
            if entry.1.len() < counts.len() {
                entry.1.resize(counts.len(), 0.0);
            }
            for (sum, c) in entry.1.iter_mut().zip(counts) {
                *sum += c;
            }
        }
    }

    fn to_json(&self) -> String {
        let map: BTreeMap<&String, serde_json::Value> = self
            .features
            .iter()
            .map(|(k, (e, c))| (k, serde_json::json!({"edges": e, "counts": c})))
            .collect();
        serde_json::to_string(&map).unwrap_or_default()
    }
}

impl Accumulator for CustomSum {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let texts = Texts::new(values[0].as_ref())?;
        let mut histograms = Histograms::default();
        for i in 0..texts.len() {
            if let Some(text) = texts.get(i) {
                if histograms.read(text) {
                    self.add(&histograms);
                }
            }
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Utf8(Some(self.to_json())))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
            + self
                .features
                .values()
                .map(|(e, c)| 64 + 8 * (e.len() + c.len()))
                .sum::<usize>()
    }
}

/// Per feature: the summed noise variance of each bucket.
#[derive(Debug, Default)]
struct CustomNoise {
    noise: BTreeMap<String, f64>,
}

impl Accumulator for CustomNoise {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let (mechanisms, scales) = (
            Texts::new(values[0].as_ref())?,
            Texts::new(values[1].as_ref())?,
        );
        let mut members = Vec::new();
        for i in 0..mechanisms.len() {
            let (Some(mechanism), Some(scales)) = (mechanisms.get(i), scales.get(i)) else {
                continue;
            };
            json::numbers(scales, None, &mut members);
            for (key, b) in members.drain(..) {
                if let Some(name) = key.strip_prefix("custom.") {
                    add_to(
                        &mut self.noise,
                        Cow::Borrowed(name),
                        noise_var(mechanism, b),
                    );
                }
            }
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let texts = Texts::new(states[0].as_ref())?;
        let mut members = Vec::new();
        for i in 0..texts.len() {
            if let Some(text) = texts.get(i) {
                json::numbers(text, None, &mut members);
                for (key, v) in members.drain(..) {
                    add_to(&mut self.noise, key, v);
                }
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Utf8(serde_json::to_string(&self.noise).ok()))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.noise.keys().map(|k| k.len() + 32).sum::<usize>()
    }
}

/// The custom-feature aggregates.
pub fn custom_udafs() -> Vec<AggregateUDF> {
    vec![
        text_udaf("custom_sum", 1, || Box::<CustomSum>::default()),
        text_udaf("custom_noise", 2, || Box::<CustomNoise>::default()),
    ]
}

/// Counts of feature `name` in a `custom_sum` result.
fn feature_counts(json: &str, name: &str) -> Option<Vec<f64>> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get(name)?
        .get("counts")?
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
}

fn feature_noise(json: &str, name: &str) -> f64 {
    serde_json::from_str::<BTreeMap<String, f64>>(json)
        .ok()
        .and_then(|m| m.get(name).copied())
        .unwrap_or(0.0)
}

/// A statistic of one feature: (ref counts, cur counts, ref noise, cur noise).
type FeatureStatistic = fn(&[f64], &[f64], f64, f64) -> Option<f64>;

/// `f(ref_sum, cur_sum, feature [, ref_noise, cur_noise])`.
fn feature_fn(name: &'static str, with_noise: bool, f: FeatureStatistic) -> ScalarUDF {
    let arity = if with_noise { 5 } else { 3 };
    create_udf(
        name,
        vec![DataType::Utf8; arity],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let cols: Vec<&datafusion::arrow::array::StringArray> = arrays
                .iter()
                .map(|a| as_string_array(a))
                .collect::<Result<_>>()?;
            let out: Float64Array = (0..cols[0].len())
                .map(|i| {
                    if cols.iter().take(3).any(|c| c.is_null(i)) {
                        return None;
                    }
                    let feature = cols[2].value(i);
                    let r = feature_counts(cols[0].value(i), feature)?;
                    let c = feature_counts(cols[1].value(i), feature)?;
                    let (nr, nc) = if with_noise && !cols[3].is_null(i) && !cols[4].is_null(i) {
                        (
                            feature_noise(cols[3].value(i), feature),
                            feature_noise(cols[4].value(i), feature),
                        )
                    } else {
                        (0.0, 0.0)
                    };
                    f(&r, &c, nr, nc).filter(|v| v.is_finite())
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// `custom_features(ref_sum, cur_sum)`: the features present in both, as
/// a list (use with `unnest`).
fn custom_features_udf() -> ScalarUDF {
    use datafusion::arrow::array::{ListBuilder, StringBuilder};
    create_udf(
        "custom_features",
        vec![DataType::Utf8, DataType::Utf8],
        DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let (r, c) = (as_string_array(&arrays[0])?, as_string_array(&arrays[1])?);
            let mut out = ListBuilder::new(StringBuilder::new());
            let names = |t: &str| -> std::collections::BTreeSet<String> {
                serde_json::from_str::<BTreeMap<String, serde_json::Value>>(t)
                    .map(|m| m.into_keys().collect())
                    .unwrap_or_default()
            };
            for i in 0..r.len() {
                if !r.is_null(i) && !c.is_null(i) {
                    let (a, b) = (names(r.value(i)), names(c.value(i)));
                    for n in a.intersection(&b) {
                        out.values().append_value(n);
                    }
                }
                out.append(true);
            }
            Ok(ColumnarValue::Array(Arc::new(out.finish())))
        }),
    )
}

/// The custom-feature scalar functions.
pub fn custom_udfs() -> Vec<ScalarUDF> {
    vec![
        custom_features_udf(),
        feature_fn("custom_psi", false, |r, c, _, _| psi(r, c)),
        feature_fn("custom_js_distance", false, |r, c, _, _| js_distance(r, c)),
        feature_fn("custom_shift_pvalue", true, hist_shift_pvalue),
    ]
}

#[cfg(test)]
mod json_aggregate_tests {
    use super::*;
    use datafusion::arrow::array::{RecordBatch, StringViewArray};
    use datafusion::arrow::datatypes::Schema;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    /// The JSON aggregates over `Utf8View` columns as the lake reads them,
    /// in two partitions (so partial states are merged), with a row that
    /// is not JSON and a NULL row adding nothing.
    #[tokio::test]
    async fn json_aggregates_over_text_views() -> Result<()> {
        let columns = ["categories", "custom", "mechanism", "noise_scale"];
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(*c, DataType::Utf8View, true))
                .collect::<Vec<_>>(),
        ));
        let batch = |rows: &[[Option<&str>; 4]]| -> Result<RecordBatch> {
            let arrays = (0..4)
                .map(|c| {
                    let values: Vec<Option<&str>> = rows.iter().map(|r| r[c]).collect();
                    Arc::new(StringViewArray::from(values)) as ArrayRef
                })
                .collect();
            Ok(RecordBatch::try_new(schema.clone(), arrays)?)
        };
        let first = batch(&[[
            Some(r#"{"label": {"a": 1, "b": 2}}"#),
            Some(r#"{"f": {"edges": [0, 1, 2], "counts": [1, 2]}}"#),
            Some("gaussian"),
            Some(r#"{"categories.label": 2, "custom.f": 3}"#),
        ]])?;
        let second = batch(&[
            [
                Some(r#"{"other": {"a": 100}, "label": {"b": 5, "c": 1}}"#),
                Some(
                    r#"{"f": {"edges": [0, 1, 2], "counts": [10, 20]}, "g": {"edges": [0, 1], "counts": [4]}}"#,
                ),
                Some("gaussian"),
                Some(r#"{"custom.f": 1, "custom.g": 2}"#),
            ],
            [Some("not json"), Some("nope"), Some("gaussian"), Some("x")],
            [None, None, None, None],
        ])?;
        let ctx = SessionContext::new();
        let table = MemTable::try_new(schema.clone(), vec![vec![first], vec![second]])?;
        ctx.register_table("t", Arc::new(table))?;
        ctx.register_udaf(category_sum_udaf());
        for udaf in custom_udafs() {
            ctx.register_udaf(udaf);
        }
        for udf in count_udfs() {
            ctx.register_udf(udf);
        }
        let batches = ctx
            .sql(
                "SELECT category_sum(categories, 'label'), custom_sum(custom), \
                 custom_noise(mechanism, noise_scale), sum(json_number(noise_scale, 'categories.label')) FROM t",
            )
            .await?
            .collect()
            .await?;
        let row = &batches[0];
        let text = |c: usize| -> serde_json::Value {
            let texts = json::Texts::new(row.column(c).as_ref()).expect("text");
            serde_json::from_str(texts.get(0).expect("not null")).expect("json")
        };
        assert_eq!(text(0), serde_json::json!({"a": 1.0, "b": 7.0, "c": 1.0}));
        assert_eq!(
            text(1),
            serde_json::json!({
                "f": {"edges": [0.0, 1.0, 2.0], "counts": [11.0, 22.0]},
                "g": {"edges": [0.0, 1.0], "counts": [4.0]},
            })
        );
        // Gaussian noise variance is the scale squared: 3^2 + 1^2 and 2^2.
        assert_eq!(text(2), serde_json::json!({"f": 10.0, "g": 4.0}));
        assert_eq!(as_float64_array(row.column(3))?.value(0), 2.0);
        Ok(())
    }

    /// `json_number` reuses the previous row's answer only when text and
    /// key are both the same.
    #[test]
    fn json_number_follows_every_row() -> Result<()> {
        let texts = StringViewArray::from(vec![
            Some(r#"{"a": 1, "b": 2}"#),
            Some(r#"{"a": 1, "b": 2}"#),
            Some(r#"{"a": 1, "b": 2}"#),
            None,
            Some(r#"{"a": 3}"#),
            Some(r#"{"a": 3}"#),
            Some("not json"),
        ]);
        let keys = StringViewArray::from(vec![
            Some("a"),
            Some("a"),
            Some("b"),
            Some("a"),
            Some("a"),
            None,
            Some("a"),
        ]);
        let udf = count_udfs()
            .into_iter()
            .find(|f| f.name() == "json_number")
            .expect("json_number");
        let out = udf.invoke_with_args(ScalarFunctionArgs {
            args: vec![
                ColumnarValue::Array(Arc::new(texts)),
                ColumnarValue::Array(Arc::new(keys)),
            ],
            arg_fields: vec![
                Arc::new(Field::new("t", DataType::Utf8View, true)),
                Arc::new(Field::new("k", DataType::Utf8View, true)),
            ],
            number_rows: 7,
            return_field: Arc::new(Field::new("n", DataType::Float64, true)),
            config_options: Arc::new(Default::default()),
        })?;
        let ColumnarValue::Array(out) = out else {
            panic!("json_number returns an array");
        };
        let got: Vec<Option<f64>> = as_float64_array(&out)?.iter().collect();
        assert_eq!(
            got,
            vec![Some(1.0), Some(1.0), Some(2.0), None, Some(3.0), None, None]
        );
        Ok(())
    }
}
