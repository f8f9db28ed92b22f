//! `date_trunc` with a fast path for UTC timestamps.
//!
//! DataFusion 55 truncates a timestamp that has a time zone to the hour or
//! the day through chrono's calendar, one row at a time, because in most
//! zones an hour or a day does not always have the same length. Every lake
//! timestamp is in UTC, where they do: `t - t mod 1 h` is the exact answer.
//! This wrapper computes that for UTC arrays and hands every other call
//! (other zones, weeks, months, scalars, strings) to DataFusion's own
//! function, so results do not change, only the time: the hourly query of
//! BENCHMARKS.md, "Queries", spent most of its time here.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, PrimitiveArray};
use datafusion::arrow::datatypes::{
    ArrowTimestampType, DataType, FieldRef, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
};
use datafusion::common::Result;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};

/// `date_trunc`, replacing DataFusion's under the same name.
pub fn udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(UtcDateTrunc {
        inner: datafusion::functions::datetime::date_trunc()
            .as_ref()
            .clone(),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct UtcDateTrunc {
    inner: ScalarUDF,
}

/// Whether `tz` names UTC (the spellings Arrow and PostgreSQL clients use).
fn is_utc(tz: &str) -> bool {
    ["UTC", "Etc/UTC", "Z", "+00:00", "+0000", "+00"]
        .iter()
        .any(|u| tz.eq_ignore_ascii_case(u))
}

/// Length of `granularity` in ticks of `unit`, for the granularities that
/// have one length in UTC and that DataFusion does not already compute by
/// arithmetic.
fn ticks(granularity: &str, unit: TimeUnit) -> Option<i64> {
    let seconds = match granularity.to_ascii_lowercase().as_str() {
        "hour" => 3_600,
        "day" => 86_400,
        _ => return None,
    };
    let per_second = match unit {
        TimeUnit::Second => 1,
        TimeUnit::Millisecond => 1_000,
        TimeUnit::Microsecond => 1_000_000,
        TimeUnit::Nanosecond => 1_000_000_000,
    };
    Some(seconds * per_second)
}

fn truncate<T: ArrowTimestampType>(array: &dyn Array, ticks: i64, tz: &Arc<str>) -> ColumnarValue {
    let array = array.as_primitive::<T>();
    let out = PrimitiveArray::<T>::from_iter_values_with_nulls(
        array.values().iter().map(|v| v - v.rem_euclid(ticks)),
        array.nulls().cloned(),
    )
    .with_timezone(tz.clone());
    ColumnarValue::Array(Arc::new(out))
}

/// The truncated array, when the call is on a UTC array with an hour or
/// day granularity; `None` for every other call.
fn utc_fast_path(args: &ScalarFunctionArgs) -> Option<ColumnarValue> {
    let [ColumnarValue::Scalar(granularity), ColumnarValue::Array(array)] = args.args.as_slice()
    else {
        return None;
    };
    let granularity = granularity.try_as_str().flatten()?;
    let DataType::Timestamp(unit, Some(tz)) = array.data_type() else {
        return None;
    };
    if !is_utc(tz) {
        return None;
    }
    let ticks = ticks(granularity, *unit)?;
    Some(match unit {
        TimeUnit::Second => truncate::<TimestampSecondType>(array, ticks, tz),
        TimeUnit::Millisecond => truncate::<TimestampMillisecondType>(array, ticks, tz),
        TimeUnit::Microsecond => truncate::<TimestampMicrosecondType>(array, ticks, tz),
        TimeUnit::Nanosecond => truncate::<TimestampNanosecondType>(array, ticks, tz),
    })
}

impl ScalarUDFImpl for UtcDateTrunc {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        match utc_fast_path(&args) {
            Some(out) => Ok(out),
            None => self.inner.invoke_with_args(args),
        }
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{RecordBatch, TimestampMicrosecondArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::common::ScalarValue;
    use datafusion::datasource::MemTable;
    use datafusion::execution::FunctionRegistry;
    use datafusion::prelude::SessionContext;

    /// The fast path gives DataFusion's own answers, nulls and times
    /// before 1970 included, for hours and days, in UTC.
    #[tokio::test]
    async fn same_answers_as_datafusion() -> Result<()> {
        let ts: TimestampMicrosecondArray = [
            Some(1_795_787_112_345_678), // 2026-11-27 13:45:12.345678
            Some(-500_000),              // 1969-12-31 23:59:59.5
            None,
            Some(1_774_747_800_000_000), // 2026-03-29 01:30:00
            Some(1_795_737_600_000_000), // 2026-11-27 00:00:00
        ]
        .into_iter()
        .collect();
        let ts = ts.with_timezone("UTC");
        let schema = Arc::new(Schema::new(vec![Field::new(
            "ts",
            ts.data_type().clone(),
            true,
        )]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ts)])?;
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))?;
        let granularities = ["hour", "day", "HOUR", "month", "minute"];
        let run = |g: &str| {
            let ctx = ctx.clone();
            let sql = format!("SELECT ts, date_trunc('{g}', ts) AS truncated FROM t ORDER BY ts");
            async move { ctx.sql(&sql).await?.collect().await }
        };
        let mut expected = Vec::new();
        for g in granularities {
            expected.push(run(g).await?);
        }
        ctx.register_udf(udf());
        let registered = ctx.udf("date_trunc")?;
        let registered: &dyn std::any::Any = registered.inner().as_ref();
        assert!(
            registered.is::<UtcDateTrunc>(),
            "replaces DataFusion's date_trunc"
        );
        for (g, expected) in granularities.iter().zip(expected) {
            let got = run(g).await?;
            assert_eq!(got, expected, "date_trunc('{g}', ts)");
            assert_eq!(got.iter().map(|b| b.num_rows()).sum::<usize>(), 5);
        }
        Ok(())
    }

    #[test]
    fn fast_path_only_for_utc_hours_and_days() {
        let array: Arc<dyn Array> = Arc::new(
            TimestampMicrosecondArray::from(vec![Some(3_601_000_001), None, Some(-1)])
                .with_timezone("UTC"),
        );
        let call = |g: &str, a: Arc<dyn Array>| {
            let field: FieldRef = Arc::new(Field::new("t", a.data_type().clone(), true));
            utc_fast_path(&ScalarFunctionArgs {
                args: vec![
                    ColumnarValue::Scalar(ScalarValue::Utf8(Some(g.to_owned()))),
                    ColumnarValue::Array(a),
                ],
                arg_fields: vec![field.clone(), field.clone()],
                number_rows: 3,
                return_field: field,
                config_options: Arc::new(Default::default()),
            })
        };
        let Some(ColumnarValue::Array(out)) = call("hour", array.clone()) else {
            panic!("UTC hours take the fast path");
        };
        let out = out.as_primitive::<TimestampMicrosecondType>();
        assert_eq!(out.value(0), 3_600_000_000);
        assert!(out.is_null(1));
        assert_eq!(out.value(2), -3_600_000_000);
        assert_eq!(out.data_type(), array.data_type());
        assert!(call("month", array.clone()).is_none());
        let paris: Arc<dyn Array> =
            Arc::new(TimestampMicrosecondArray::from(vec![Some(0)]).with_timezone("Europe/Paris"));
        assert!(call("hour", paris).is_none());
    }
}
