//! Statistics over noised counts, as SQL functions, for analysts, views and
//! detectors.
//!
//! Every noised count in the lake is its true value plus independent,
//! zero-mean noise of known scale (`scale_*` columns, `mechanism`). So a
//! fleet sum is unbiased, and its noise variance is the sum of each row's
//! [`noise_var`]; a standard error is the square root of that sum.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Float64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::cast::{as_float64_array, as_string_array};
use datafusion::logical_expr::{create_udf, ColumnarValue, ScalarUDF, Volatility};

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
pub fn noise_var_udf() -> ScalarUDF {
    create_udf(
        "noise_var",
        vec![DataType::Utf8, DataType::Float64],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let mechanisms = as_string_array(&arrays[0])?;
            let scales = as_float64_array(&arrays[1])?;
            let out: Float64Array = (0..mechanisms.len())
                .map(|i| {
                    if mechanisms.is_null(i) || scales.is_null(i) {
                        Some(0.0)
                    } else {
                        Some(noise_var(mechanisms.value(i), scales.value(i)))
                    }
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
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
}
