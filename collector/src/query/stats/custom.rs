//! Custom features' histograms (JSON), summed and compared, as SQL functions.

use super::*;

// An app's own numeric features arrive as histograms in the `custom` JSON
// column: {"image_brightness": {"edges": [...], "counts": [...]}}.
// `custom_sum(custom)` adds every feature's counts over rows (keeping the
// first edges seen); `custom_noise(mechanism, noise_scale)` sums each
// feature's per-bucket noise variance; `custom_features(ref, cur)` lists the
// features present in both (for `unnest`); `custom_psi` and
// `custom_shift_pvalue` compare one feature.

/// Per feature: edges and summed counts.
#[derive(Debug, Default)]
pub(super) struct CustomSum {
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
pub(super) struct CustomNoise {
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
pub(super) fn feature_counts(json: &str, name: &str) -> Option<Vec<f64>> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get(name)?
        .get("counts")?
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
}

pub(super) fn feature_noise(json: &str, name: &str) -> f64 {
    serde_json::from_str::<BTreeMap<String, f64>>(json)
        .ok()
        .and_then(|m| m.get(name).copied())
        .unwrap_or(0.0)
}

/// A statistic of one feature: (ref counts, cur counts, ref noise, cur noise).
pub(super) type FeatureStatistic = fn(&[f64], &[f64], f64, f64) -> Option<f64>;

/// `f(ref_sum, cur_sum, feature [, ref_noise, cur_noise])`.
pub(super) fn feature_fn(name: &'static str, with_noise: bool, f: FeatureStatistic) -> ScalarUDF {
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
pub(super) fn custom_features_udf() -> ScalarUDF {
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
