//! A bound on the values SQL functions build.
//!
//! DataFusion's memory pool sees what operators buffer (hash tables,
//! sorts), not the values a scalar function returns, and constant
//! expressions are folded while a statement is planned, before any limit
//! applies: `SELECT length(repeat('x', 1500000000))` allocates 1.5 GB on
//! the spot. The functions that can build a value much larger than their
//! inputs (`repeat`, `lpad`, `array_repeat`, `range`, ...) are replaced by
//! [`Capped`] copies that refuse, before computing, a call whose result
//! could exceed the limit, and check every result they return. The error
//! is SQLSTATE 54000 (program_limit_exceeded), as PostgreSQL answers
//! `repeat('x', 1500000000)`.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, FieldRef, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{ExprSchema, ScalarValue};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::preimage::PreimageResult;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ExpressionPlacement, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, StructFieldMapping,
};
use datafusion::prelude::SessionContext;

/// The prefix of the error a capped function returns; the SQL endpoint
/// answers it with SQLSTATE 54000.
pub const VALUE_TOO_LARGE: &str = "value too large";

/// How a function's result can grow with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: text length times n.
    Repeat,
    /// `lpad/rpad(text, n [, fill])`: n characters of up to 4 bytes.
    Pad,
    /// `array_repeat(x, n)`, `array_resize(array, n [, x])`: n elements.
    ArrayOfN,
    /// `replace(text, from, to)`, `regexp_replace(text, pattern, to, ...)`:
    /// at most one `to` per character of `text`, plus `text`.
    Replace,
    /// `range/generate_series(start, stop [, step])` as a list value.
    Series,
    /// `concat`, `concat_ws`, `array_concat`: the sum of the arguments.
    Sum,
}

/// The functions that are capped, and how their results grow.
const CAPPED: [(&str, Growth); 13] = [
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("array_repeat", Growth::ArrayOfN),
    ("array_resize", Growth::ArrayOfN),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::Replace),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
    ("concat", Growth::Sum),
    ("concat_ws", Growth::Sum),
    ("array_concat", Growth::Sum),
    ("overlay", Growth::Sum),
];

/// Replaces every function of [`CAPPED`] registered in `ctx` by a copy
/// whose results are at most `max_bytes` (all rows of one call together).
pub fn cap_values(ctx: &SessionContext, max_bytes: usize) {
    let state = ctx.state();
    for (name, growth) in CAPPED {
        if let Some(inner) = state.scalar_functions().get(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Capped {
                inner: inner.clone(),
                growth,
                max_bytes,
            }));
        }
    }
}

/// A function whose results are bounded: see the module's documentation.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Capped {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    max_bytes: usize,
}

fn too_large(what: String) -> DataFusionError {
    DataFusionError::Execution(format!("{VALUE_TOO_LARGE}: {what}"))
}

/// The largest length in bytes of a text, binary or list argument's
/// values (0 for other types and NULLs).
fn max_len(arg: &ColumnarValue) -> u64 {
    let array = match arg {
        ColumnarValue::Scalar(s) => match s.to_array_of_size(1) {
            Ok(a) => a,
            Err(_) => return 0,
        },
        ColumnarValue::Array(a) => a.clone(),
    };
    let widest = |offsets: &mut dyn Iterator<Item = u64>| offsets.max().unwrap_or(0);
    match array.data_type() {
        DataType::Utf8 => widest(
            &mut array
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(|s| s.len() as u64),
        ),
        DataType::LargeUtf8 => widest(
            &mut array
                .as_string::<i64>()
                .iter()
                .flatten()
                .map(|s| s.len() as u64),
        ),
        DataType::Utf8View => widest(
            &mut array
                .as_string_view()
                .iter()
                .flatten()
                .map(|s| s.len() as u64),
        ),
        DataType::Binary => widest(
            &mut array
                .as_binary::<i32>()
                .iter()
                .flatten()
                .map(|s| s.len() as u64),
        ),
        DataType::LargeBinary => widest(
            &mut array
                .as_binary::<i64>()
                .iter()
                .flatten()
                .map(|s| s.len() as u64),
        ),
        DataType::List(_) => widest(
            &mut array
                .as_list::<i32>()
                .iter()
                .flatten()
                .map(|v| v.get_array_memory_size() as u64),
        ),
        DataType::LargeList(_) => widest(
            &mut array
                .as_list::<i64>()
                .iter()
                .flatten()
                .map(|v| v.get_array_memory_size() as u64),
        ),
        _ => 0,
    }
}

/// The largest integer value of an argument (0 when it has none).
fn max_int(arg: &ColumnarValue) -> u64 {
    let array = match arg {
        ColumnarValue::Scalar(s) => match s.to_array_of_size(1) {
            Ok(a) => a,
            Err(_) => return 0,
        },
        ColumnarValue::Array(a) => a.clone(),
    };
    if !array.data_type().is_integer() {
        return 0;
    }
    match cast(&array, &DataType::Int64) {
        Ok(a) => a
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .iter()
            .flatten()
            .max()
            .map_or(0, |v| v.max(0) as u64),
        Err(_) => 0,
    }
}

/// A scalar argument as a number on one axis: integers as they are,
/// dates and timestamps in nanoseconds, intervals in nanoseconds (a month
/// as 31 days, the longest it can be).
fn as_number(arg: &ColumnarValue) -> Option<i128> {
    let ColumnarValue::Scalar(s) = arg else {
        return None;
    };
    match s {
        ScalarValue::IntervalMonthDayNano(Some(v)) => Some(
            i128::from(v.months) * 31 * 86_400_000_000_000
                + i128::from(v.days) * 86_400_000_000_000
                + i128::from(v.nanoseconds),
        ),
        ScalarValue::IntervalDayTime(Some(v)) => {
            Some(i128::from(v.days) * 86_400_000_000_000 + i128::from(v.milliseconds) * 1_000_000)
        }
        ScalarValue::IntervalYearMonth(Some(v)) => Some(i128::from(*v) * 31 * 86_400_000_000_000),
        s if s.data_type().is_integer() => match s.cast_to(&DataType::Int64) {
            Ok(ScalarValue::Int64(Some(v))) => Some(i128::from(v)),
            _ => None,
        },
        s if s.data_type().is_temporal() => {
            match s.cast_to(&DataType::Timestamp(TimeUnit::Nanosecond, None)) {
                Ok(ScalarValue::TimestampNanosecond(Some(v), _)) => Some(i128::from(v)),
                _ => None,
            }
        }
        _ => None,
    }
}

impl Capped {
    /// An upper bound of the bytes one call's result takes, from its
    /// arguments, or `None` when the arguments do not tell.
    fn bound(&self, args: &ScalarFunctionArgs) -> Option<u64> {
        let a = &args.args;
        let rows = if a.iter().any(|v| matches!(v, ColumnarValue::Array(_))) {
            args.number_rows.max(1) as u64
        } else {
            1
        };
        let arg = |i: usize| a.get(i);
        let per_row = match self.growth {
            Growth::Repeat => max_len(arg(0)?).saturating_mul(max_int(arg(1)?)),
            Growth::Pad => max_int(arg(1)?).saturating_mul(4),
            Growth::ArrayOfN => {
                let element = a.iter().map(max_len).max().unwrap_or(0).max(16);
                max_int(arg(1)?).saturating_mul(element)
            }
            Growth::Replace => {
                let text = max_len(arg(0)?);
                let to = max_len(arg(2)?);
                text.saturating_add(1)
                    .saturating_mul(to)
                    .saturating_add(text)
            }
            Growth::Series => {
                let start = as_number(arg(0)?)?;
                let (start, stop, step) = match a.len() {
                    1 => (0, start, 1),
                    _ => (
                        start,
                        as_number(arg(1)?)?,
                        match arg(2) {
                            Some(s) => as_number(s)?,
                            None => 1,
                        },
                    ),
                };
                if step == 0 {
                    return None;
                }
                let count = ((stop - start) / step).max(0) as u128 + 1;
                u64::try_from(count.saturating_mul(16)).unwrap_or(u64::MAX)
            }
            Growth::Sum => a.iter().map(max_len).fold(0u64, u64::saturating_add),
        };
        Some(per_row.saturating_mul(rows))
    }

    /// The bytes a result takes.
    fn size(value: &ColumnarValue) -> u64 {
        match value {
            ColumnarValue::Array(a) => a.get_array_memory_size() as u64,
            ColumnarValue::Scalar(s) => s.size() as u64,
        }
    }
}

impl ScalarUDFImpl for Capped {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        #[allow(deprecated)]
        self.inner.inner().display_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.inner().return_field_from_args(args)
    }

    fn is_nullable(&self, args: &[Expr], schema: &dyn ExprSchema) -> bool {
        #[allow(deprecated)]
        self.inner.inner().is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let max = self.max_bytes as u64;
        if let Some(bound) = self.bound(&args) {
            if bound > max {
                return Err(too_large(format!(
                    "{}() would build up to {bound} bytes, more than the endpoint's limit of {max} bytes per value",
                    self.name()
                )));
            }
        }
        let result = self.inner.invoke_with_args(args)?;
        let size = Capped::size(&result);
        if size > max {
            return Err(too_large(format!(
                "{}() built {size} bytes, more than the endpoint's limit of {max} bytes per value",
                self.name()
            )));
        }
        Ok(result)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let inner = self.inner.inner().with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(Capped {
            inner: Arc::new(inner),
            growth: self.growth,
            max_bytes: self.max_bytes,
        }))
    }

    /// Some functions compute their result while the plan is simplified
    /// (`concat` joins its literal arguments): that result is checked, and
    /// a rewritten call of the same function is capped again.
    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        let max = self.max_bytes as u64;
        let check = |size: u64| {
            if size > max {
                Err(too_large(format!(
                    "{}() built {size} bytes, more than the endpoint's limit of {max} bytes per value",
                    self.name()
                )))
            } else {
                Ok(())
            }
        };
        Ok(match self.inner.inner().simplify(args, info)? {
            ExprSimplifyResult::Simplified(Expr::Literal(value, meta)) => {
                check(value.size() as u64)?;
                ExprSimplifyResult::Simplified(Expr::Literal(value, meta))
            }
            ExprSimplifyResult::Simplified(Expr::ScalarFunction(mut call))
                if call.func.name() == self.name() =>
            {
                let literals = call.args.iter().map(|a| match a {
                    Expr::Literal(v, _) => v.size() as u64,
                    _ => 0,
                });
                check(literals.fold(0, u64::saturating_add))?;
                call.func = Arc::new(ScalarUDF::new_from_impl(Capped {
                    inner: call.func.clone(),
                    growth: self.growth,
                    max_bytes: self.max_bytes,
                }));
                ExprSimplifyResult::Simplified(Expr::ScalarFunction(call))
            }
            other => other,
        })
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<PreimageResult> {
        self.inner.inner().preimage(args, lit_expr, info)
    }

    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }

    fn short_circuits(&self) -> bool {
        self.inner.inner().short_circuits()
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.inner().evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        self.inner.inner().propagate_constraints(interval, inputs)
    }

    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<StructFieldMapping> {
        self.inner.inner().struct_field_mapping(literal_args)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.inner().output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.inner().documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.inner().placement(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn capped(max: usize) -> SessionContext {
        let ctx = SessionContext::new();
        cap_values(&ctx, max);
        ctx
    }

    async fn run(ctx: &SessionContext, sql: &str) -> Result<String> {
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
    }

    #[tokio::test]
    async fn calls_that_would_build_a_huge_value_are_refused_before_they_run() {
        let ctx = capped(1 << 20).await;
        for sql in [
            "SELECT length(repeat('x', 1500000000))",
            "SELECT lpad('x', 2000000000)",
            "SELECT rpad('x', 2000000000, 'yz')",
            "SELECT cardinality(array_repeat(1, 1000000000))",
            "SELECT cardinality(range(1, 10000000000))",
            "SELECT cardinality(generate_series(TIMESTAMP '2000-01-01', TIMESTAMP '2200-01-01', INTERVAL '1 second'))",
            "SELECT length(replace(repeat('x', 1000000), 'x', repeat('y', 1000)))",
            "SELECT length(regexp_replace(repeat('x', 1000000), '', repeat('y', 1000), 'g'))",
            "SELECT length(concat(repeat('x', 700000), repeat('y', 700000)))",
        ] {
            let e = run(&ctx, sql).await.expect_err(sql).to_string();
            assert!(e.contains(VALUE_TOO_LARGE), "{sql}: {e}");
        }
    }

    #[tokio::test]
    async fn the_bound_counts_every_row_of_a_call() {
        let ctx = capped(1 << 20).await;
        // 1,000 rows of 2 KB: 2 MB from one call over a column.
        let sql = "SELECT max(length(repeat('x', CAST(v AS BIGINT)))) FROM (SELECT 2000 AS v FROM generate_series(1, 1000))";
        let e = run(&ctx, sql).await.expect_err(sql).to_string();
        assert!(e.contains(VALUE_TOO_LARGE), "{e}");
    }

    #[tokio::test]
    async fn ordinary_calls_are_unchanged() {
        let ctx = capped(1 << 20).await;
        let out = run(
            &ctx,
            "SELECT repeat('ab', 3) AS r, lpad('7', 3, '0') AS p, cardinality(range(1, 5)) AS n, \
             concat('a', 'b') AS c, replace('aXa', 'X', 'yy') AS s",
        )
        .await
        .expect("small values");
        for cell in ["ababab", "007", "| 4 ", "ab", "ayya"] {
            assert!(out.contains(cell), "{cell} in {out}");
        }
    }
}
