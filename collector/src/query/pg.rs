//! PostgreSQL functions and settings that clients read on connect and
//! that `datafusion-postgres` does not provide.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::arrow::datatypes::DataType;
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
/// (`pg_get_indexdef`); the lake has none of these.
#[derive(Debug, PartialEq, Eq, Hash)]
struct NullText {
    name: &'static str,
    signature: Signature,
}

impl ScalarUDFImpl for NullText {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType, DataFusionError> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        _args: ScalarFunctionArgs,
    ) -> Result<ColumnarValue, DataFusionError> {
        Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None)))
    }
}

/// The catalog functions of [`NullText`], with their arities.
pub fn null_catalog_functions() -> Vec<ScalarUDF> {
    [
        ("pg_get_serial_sequence", &[2][..]),
        ("obj_description", &[1, 2]),
        ("col_description", &[2]),
        ("shobj_description", &[2]),
        ("pg_get_indexdef", &[1, 3]),
        ("pg_get_viewdef", &[1, 2]),
        ("pg_get_triggerdef", &[1, 2]),
        ("pg_get_functiondef", &[1]),
    ]
    .into_iter()
    .map(|(name, arities)| {
        ScalarUDF::new_from_impl(NullText {
            name,
            signature: Signature::one_of(
                arities.iter().map(|n| TypeSignature::Any(*n)).collect(),
                Volatility::Stable,
            ),
        })
    })
    .collect()
}

/// `current_setting(name)`: the value of a server setting; an unknown
/// name is an error, as in PostgreSQL.
pub fn current_setting() -> ScalarUDF {
    create_udf(
        "current_setting",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let names = as_string_array(&arrays[0])?;
            let mut out = Vec::with_capacity(names.len());
            for i in 0..names.len() {
                if names.is_null(i) {
                    out.push(None);
                    continue;
                }
                let name = names.value(i);
                match setting(name) {
                    Some(v) => out.push(Some(v)),
                    None => {
                        return Err(DataFusionError::Execution(format!(
                            "unrecognized configuration parameter \"{name}\""
                        )))
                    }
                }
            }
            let array: ArrayRef = Arc::new(StringArray::from(out));
            if arrays[0].len() == 1 && matches!(args[0], ColumnarValue::Scalar(_)) {
                Ok(ColumnarValue::Scalar(
                    datafusion::common::ScalarValue::try_from_array(&array, 0)?,
                ))
            } else {
                Ok(ColumnarValue::Array(array))
            }
        }),
    )
}
