//! PostgreSQL functions and settings that clients read on connect and
//! that `datafusion-postgres` does not provide.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::prelude::SessionContext;

use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::{cast::as_string_array, DataFusionError, ScalarValue};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    TypeSignature, Volatility,
};

/// The PostgreSQL release the endpoint presents itself as: the protocol,
/// catalog and functions clients see follow PostgreSQL 16.
pub const SERVER_VERSION: &str = "16.6";

/// A server setting: its name (lower case), its value on this server, and
/// whether a connection may change it for itself with `SET`.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    pub value: &'static str,
    pub settable: bool,
}

const fn fixed(name: &'static str, value: &'static str) -> Setting {
    Setting {
        name,
        value,
        settable: false,
    }
}

const fn per_connection(name: &'static str, value: &'static str) -> Setting {
    Setting {
        name,
        value,
        settable: true,
    }
}

/// The settings clients read or set. `SET` of a name that is not here is
/// refused (42704), as PostgreSQL refuses an unknown parameter.
pub const SETTINGS: [Setting; 27] = [
    per_connection("application_name", ""),
    per_connection("bytea_output", "hex"),
    per_connection("client_encoding", "UTF8"),
    per_connection("client_min_messages", "notice"),
    per_connection("datestyle", "ISO, MDY"),
    per_connection("default_transaction_isolation", "read committed"),
    per_connection("extra_float_digits", "1"),
    per_connection("idle_in_transaction_session_timeout", "0"),
    per_connection("intervalstyle", "postgres"),
    per_connection("jit", "off"),
    per_connection("lock_timeout", "0"),
    per_connection("search_path", "\"$user\", public"),
    per_connection("statement_timeout", "0"),
    per_connection("timezone", "UTC"),
    per_connection("work_mem", "4MB"),
    fixed("default_transaction_read_only", "on"),
    fixed("in_hot_standby", "off"),
    fixed("integer_datetimes", "on"),
    fixed("is_superuser", "off"),
    fixed("max_identifier_length", "63"),
    fixed("server_encoding", "UTF8"),
    fixed("server_version", SERVER_VERSION),
    fixed("server_version_num", "160006"),
    fixed("standard_conforming_strings", "on"),
    fixed("transaction_isolation", "read committed"),
    fixed("transaction_read_only", "on"),
    fixed("lc_collate", "C"),
];

/// The server setting `name` (case-insensitive), if known.
pub fn find(name: &str) -> Option<&'static Setting> {
    let name = name.to_ascii_lowercase();
    SETTINGS.iter().find(|s| s.name == name)
}

/// The value of server setting `name` (case-insensitive), if known.
pub fn setting(name: &str) -> Option<&'static str> {
    find(name).map(|s| s.value)
}

/// `version()`, shaped like PostgreSQL's so that clients that parse it
/// (SQLAlchemy, pgAdmin) find a version they know, and naming what
/// really answers.
pub fn version_string() -> String {
    format!(
        "PostgreSQL {SERVER_VERSION} (Driftline {}, Apache DataFusion {}) on {}-{}, 64-bit",
        env!("CARGO_PKG_VERSION"),
        datafusion::DATAFUSION_VERSION,
        std::env::consts::ARCH,
        std::env::consts::OS,
    )
}

/// `version()`: see [`version_string`].
pub fn version() -> ScalarUDF {
    let text = version_string();
    create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_args: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(text.clone()))))
        }),
    )
}

/// A catalog function that answers NULL: what PostgreSQL answers for an
/// object without a comment (`obj_description`), a column that owns no
/// sequence (`pg_get_serial_sequence`) or an index that does not exist
/// (`pg_get_indexdef`); the lake has none of these. `_pg_expandarray`
/// (JDBC's primary keys) is only ever called on the rows of `pg_index`,
/// which is empty: the lake has no indexes.
#[derive(Debug, PartialEq, Eq, Hash)]
struct NullOf {
    name: &'static str,
    signature: Signature,
    returns: DataType,
}

impl ScalarUDFImpl for NullOf {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType, DataFusionError> {
        Ok(self.returns.clone())
    }

    fn invoke_with_args(
        &self,
        _args: ScalarFunctionArgs,
    ) -> Result<ColumnarValue, DataFusionError> {
        Ok(ColumnarValue::Scalar(ScalarValue::try_from(&self.returns)?))
    }
}

/// `json_build_object(key, value, ...)`: a JSON object as text, as
/// PostgreSQL builds it (SQLAlchemy's column reflection asks for one).
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: Signature,
}

/// A value as JSON: numbers and booleans as themselves, NULL as null,
/// anything else as its text.
fn to_json(value: ScalarValue) -> serde_json::Value {
    use serde_json::Value;
    if value.is_null() {
        return Value::Null;
    }
    match value {
        ScalarValue::Boolean(Some(b)) => Value::Bool(b),
        ScalarValue::Float32(Some(f)) => {
            serde_json::Number::from_f64(f64::from(f)).map_or(Value::Null, Value::Number)
        }
        ScalarValue::Float64(Some(f)) => {
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        v if v.data_type().is_integer() => match v.cast_to(&DataType::Int64) {
            Ok(ScalarValue::Int64(Some(i))) => Value::from(i),
            _ => Value::String(v.to_string()),
        },
        v => Value::String(v.to_string()),
    }
}

impl ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType, DataFusionError> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue, DataFusionError> {
        if !args.args.len().is_multiple_of(2) {
            return Err(DataFusionError::Execution(
                "json_build_object needs an even number of arguments (key, value, ...)".into(),
            ));
        }
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let mut out = Vec::with_capacity(rows);
        for row in 0..rows {
            let mut object = serde_json::Map::new();
            for pair in arrays.chunks(2) {
                let key = ScalarValue::try_from_array(&pair[0], row)?;
                let value = ScalarValue::try_from_array(&pair[1], row)?;
                object.insert(key.to_string(), to_json(value));
            }
            out.push(serde_json::Value::Object(object).to_string());
        }
        Ok(ColumnarValue::Array(Arc::new(StringArray::from(out))))
    }
}

/// `json_build_object`: see [`JsonBuildObject`].
pub fn json_build_object() -> ScalarUDF {
    ScalarUDF::new_from_impl(JsonBuildObject {
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

/// The catalog functions of [`NullText`], with their arities.
pub fn null_catalog_functions() -> Vec<ScalarUDF> {
    let expandarray = ScalarUDF::new_from_impl(NullOf {
        name: "_pg_expandarray",
        signature: Signature::any(1, Volatility::Immutable),
        returns: DataType::Struct(
            vec![
                Field::new("x", DataType::Int32, true),
                Field::new("n", DataType::Int32, true),
            ]
            .into(),
        ),
    });
    [
        ("pg_get_serial_sequence", &[2][..]),
        ("obj_description", &[1, 2]),
        ("col_description", &[2]),
        ("shobj_description", &[2]),
        ("pg_get_indexdef", &[1, 3]),
        ("pg_get_viewdef", &[1, 2]),
        ("pg_get_triggerdef", &[1, 2]),
        ("pg_get_functiondef", &[1]),
        ("pg_get_function_result", &[1]),
        ("pg_get_function_arguments", &[1]),
        ("pg_get_function_identity_arguments", &[1]),
    ]
    .into_iter()
    .map(|(name, arities)| {
        ScalarUDF::new_from_impl(NullOf {
            name,
            signature: Signature::one_of(
                arities.iter().map(|n| TypeSignature::Any(*n)).collect(),
                Volatility::Stable,
            ),
            returns: DataType::Utf8,
        })
    })
    .chain(std::iter::once(expandarray))
    .collect()
}

/// The type names `to_regtype` resolves: PostgreSQL's built-in types of
/// the lake's columns and parameters, with their OIDs.
const TYPE_OIDS: [(&str, i32); 16] = [
    ("bool", 16),
    ("bytea", 17),
    ("int8", 20),
    ("int2", 21),
    ("int4", 23),
    ("text", 25),
    ("json", 114),
    ("float4", 700),
    ("float8", 701),
    ("varchar", 1043),
    ("date", 1082),
    ("time", 1083),
    ("timestamp", 1114),
    ("timestamptz", 1184),
    ("interval", 1186),
    ("numeric", 1700),
];

/// `to_regtype(name)`: a built-in type's OID, NULL for any other name (the
/// lake has no extension types such as hstore, which drivers look for).
pub fn to_regtype() -> ScalarUDF {
    create_udf(
        "to_regtype",
        vec![DataType::Utf8],
        DataType::Int32,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let names = as_string_array(&arrays[0])?;
            let oids: datafusion::arrow::array::Int32Array = names
                .iter()
                .map(|name| {
                    let name = name?
                        .trim()
                        .trim_start_matches("pg_catalog.")
                        .to_lowercase();
                    TYPE_OIDS
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, oid)| *oid)
                })
                .collect();
            if matches!(args[0], ColumnarValue::Scalar(_)) {
                Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
                    &oids, 0,
                )?))
            } else {
                Ok(ColumnarValue::Array(Arc::new(oids)))
            }
        }),
    )
}

/// `pg_function_is_visible(oid)` (psql's `\df`), `pg_collation_is_visible`
/// (SQLAlchemy's reflection), ...: everything the catalog lists is visible.
pub fn visibility_functions() -> Vec<ScalarUDF> {
    [
        "pg_function_is_visible",
        "pg_collation_is_visible",
        "pg_type_is_visible",
    ]
    .into_iter()
    .map(|name| {
        create_udf(
            name,
            vec![DataType::Int32],
            DataType::Boolean,
            Volatility::Stable,
            Arc::new(|_args: &[ColumnarValue]| {
                Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))))
            }),
        )
    })
    .collect()
}

/// `current_setting(name)`: the value of a setting; an unknown name is an
/// error, as in PostgreSQL. `timezone` is the statement's own (a SQL
/// endpoint connection's `SET TIME ZONE`); the others are the server's.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CurrentSetting {
    signature: Signature,
}

impl ScalarUDFImpl for CurrentSetting {
    fn name(&self) -> &str {
        "current_setting"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType, DataFusionError> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue, DataFusionError> {
        let time_zone = args.config_options.execution.time_zone.clone();
        let scalar = matches!(args.args[0], ColumnarValue::Scalar(_));
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let names = as_string_array(&arrays[0])?;
        let mut out: Vec<Option<String>> = Vec::with_capacity(names.len());
        for name in names.iter() {
            let Some(name) = name else {
                out.push(None);
                continue;
            };
            let value = match (name.to_ascii_lowercase().as_str(), &time_zone) {
                ("timezone", Some(tz)) => Some(tz.clone()),
                _ => setting(name).map(str::to_owned),
            };
            match value {
                Some(v) => out.push(Some(v)),
                None => {
                    return Err(DataFusionError::Execution(format!(
                        "unrecognized configuration parameter \"{name}\""
                    )))
                }
            }
        }
        let array: ArrayRef = Arc::new(StringArray::from(out));
        if scalar && array.len() == 1 {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
                &array, 0,
            )?))
        } else {
            Ok(ColumnarValue::Array(array))
        }
    }
}

/// `current_setting`: see [`CurrentSetting`].
pub fn current_setting() -> ScalarUDF {
    ScalarUDF::new_from_impl(CurrentSetting {
        signature: Signature::exact(vec![DataType::Utf8], Volatility::Stable),
    })
}

/// The columns drivers read that `datafusion-pg-catalog`'s tables lack
/// (SQLAlchemy's index reflection reads `pg_class.reloptions`), each as
/// `expression AS name` over the table.
const MISSING_COLUMNS: [(&str, &str, &str); 1] =
    [("pg_class", "reloptions", "CAST(NULL AS VARCHAR)")];

/// `pg_catalog` with [`MISSING_COLUMNS`] added: a table that lacks one is
/// served as a view over itself with the column; every other table is the
/// catalog's own.
#[derive(Debug)]
struct CatalogOverlay {
    inner: Arc<dyn SchemaProvider>,
    views: HashMap<String, Arc<dyn TableProvider>>,
}

#[async_trait::async_trait]
impl SchemaProvider for CatalogOverlay {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        match self.views.get(name) {
            Some(view) => Ok(Some(view.clone())),
            None => self.inner.table(name).await,
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// Adds [`MISSING_COLUMNS`] to the `pg_catalog` of `catalog` in `ctx`.
pub async fn add_missing_columns(
    ctx: &SessionContext,
    catalog: &str,
) -> Result<(), DataFusionError> {
    let Some(catalog) = ctx.catalog(catalog) else {
        return Ok(());
    };
    let Some(inner) = catalog.schema("pg_catalog") else {
        return Ok(());
    };
    let mut views = HashMap::new();
    for (table, column, value) in MISSING_COLUMNS {
        let Some(provider) = inner.table(table).await? else {
            continue;
        };
        if provider.schema().column_with_name(column).is_some() {
            continue;
        }
        let view = ctx
            .sql(&format!(
                "SELECT *, {value} AS {column} FROM pg_catalog.{table}"
            ))
            .await?
            .into_view();
        views.insert(table.to_owned(), view);
    }
    catalog.register_schema("pg_catalog", Arc::new(CatalogOverlay { inner, views }))?;
    Ok(())
}
