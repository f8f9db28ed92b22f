//! Noise variances of the noised counts, and the SQL function `noise_var`.

use super::*;

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
pub(super) fn noise_vars<'a>(
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
