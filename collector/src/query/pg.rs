//! PostgreSQL functions that clients call on connect and that
//! `datafusion-postgres` does not provide.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{cast::as_string_array, DataFusionError};
use datafusion::logical_expr::{create_udf, ColumnarValue, ScalarUDF, Volatility};

/// The server settings clients read, with the values this server has.
const SETTINGS: [(&str, &str); 12] = [
    ("search_path", "\"$user\", public"),
    ("timezone", "UTC"),
    ("server_version", "16.0"),
    ("server_version_num", "160000"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("datestyle", "ISO, MDY"),
    ("intervalstyle", "postgres"),
    ("standard_conforming_strings", "on"),
    ("integer_datetimes", "on"),
    ("max_identifier_length", "63"),
    ("default_transaction_read_only", "on"),
];

/// The value of server setting `name` (case-insensitive), if known.
pub fn setting(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    SETTINGS.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
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
