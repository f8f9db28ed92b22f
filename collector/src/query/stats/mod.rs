//! Statistics over noised counts, as SQL functions, for analysts, views and
//! detectors.
//!
//! Every noised count in the lake is its true value plus independent,
//! zero-mean noise of known scale (`scale_*` columns, `mechanism`). So a
//! fleet sum is unbiased, and its noise variance is the sum of each row's
//! [`noise_var`]; a standard error is the square root of that sum.

//!
//! By kind: [`noise`] (noise variances), [`hist`] (histogram and rate
//! statistics over aggregated counts), [`labels`] (categorical counts as
//! JSON) and [`custom`] (custom features' histograms as JSON).

use std::sync::Arc;

use super::json::{self, texts_signature, Histograms, Texts};
use datafusion::arrow::array::{Array, ArrayAccessor, Float64Array};
use datafusion::arrow::array::{ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::datatypes::Field;
use datafusion::common::cast::{as_float64_array, as_string_array};
use datafusion::error::Result;
use datafusion::logical_expr::{
    create_udf, ColumnarValue, ScalarUDF, SimpleScalarUDF, TypeSignature, Volatility,
};
use datafusion::logical_expr::{Accumulator, AggregateUDF, SimpleAggregateUDF};
use datafusion::logical_expr::{ScalarFunctionArgs, ScalarUDFImpl, Signature};
use datafusion::scalar::ScalarValue;
use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};
use std::borrow::Cow;
use std::collections::BTreeMap;

mod custom;
mod hist;
mod labels;
mod noise;

pub use custom::*;
pub use hist::*;
pub use labels::*;
pub use noise::*;
