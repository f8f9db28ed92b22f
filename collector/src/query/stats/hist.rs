//! Histogram and rate statistics over aggregated counts, as SQL functions.

use super::*;

// Fleet histograms are sums of noised bucket counts: each bucket carries
// sampling variation (the events themselves) and noise of known variance
// (the same for every bucket of a field: `noise`, the sum of the rows'
// `noise_var`). The functions below take both into account, so a
// threshold on their p-values holds its false-alarm rate whatever epsilon
// and fleet size are.

/// Noisy counts clamped at zero (a negative count is noise around 0).
pub(super) fn clamp(counts: &[f64]) -> Vec<f64> {
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
pub(super) fn mids(edges: &[f64], n: usize) -> Vec<f64> {
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
pub(super) fn quantile_position(counts: &[f64], q: f64) -> Option<(usize, f64)> {
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
pub(super) struct RowFn {
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
pub(super) fn row_values(array: &ArrayRef, row: usize) -> Result<Option<Vec<f64>>> {
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

pub(super) fn row_fn(
    name: &'static str,
    arity: usize,
    f: fn(&[Vec<f64>]) -> Option<f64>,
) -> ScalarUDF {
    ScalarUDF::new_from_impl(RowFn {
        name,
        signature: Signature::any(arity, Volatility::Immutable),
        f,
    })
}

pub(super) fn scalar(v: &[f64]) -> f64 {
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
