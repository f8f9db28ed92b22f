//! Categorical counts (JSON objects), summed and compared, as SQL functions.

use super::*;

// Categorical fields (`categories`, e.g. predicted labels) are stored as
// JSON text: {"label": {"billing": 21, "cancel": 9}}. `category_sum` adds
// one field's counts over rows into a JSON object; the `*_counts`
// functions compare two such objects over the union of their keys.

/// Adds `n` to `key`'s sum, copying the key only the first time.
pub(super) fn add_to(sums: &mut BTreeMap<String, f64>, key: Cow<str>, n: f64) {
    match sums.get_mut(key.as_ref()) {
        Some(sum) => *sum += n,
        None => {
            sums.insert(key.into_owned(), n);
        }
    }
}

/// An aggregate over text arguments as stored; its state is one JSON text.
pub(super) fn text_udaf(
    name: &str,
    arity: usize,
    accumulator: fn() -> Box<dyn Accumulator>,
) -> AggregateUDF {
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
pub(super) struct CategorySum {
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
pub(super) fn aligned(reference: &str, current: &str) -> Option<(Vec<f64>, Vec<f64>)> {
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
pub(super) type CountsStatistic = fn(&[f64], &[f64], &[f64]) -> Option<f64>;

/// A SQL function over two JSON count objects (and optional floats).
pub(super) fn counts_fn(name: &'static str, arity: usize, f: CountsStatistic) -> ScalarUDF {
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
pub(super) fn json_number_udf() -> ScalarUDF {
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
