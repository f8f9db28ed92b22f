//! `information_schema` with PostgreSQL type names.
//!
//! DataFusion's own `information_schema.columns.data_type` shows Arrow type
//! names (`Timestamp(µs, "UTC")`), which PostgreSQL clients such as
//! Grafana's query builder do not understand. This one answers like
//! PostgreSQL (`timestamp with time zone`, `bigint`, `text`), for the
//! tables `tables`, `columns`, `schemata` and `views`, computed from the
//! catalog at each query.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, Int32Builder, RecordBatch, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{CatalogProviderList, SchemaProvider, Session, TableProvider};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

/// The schema name, as PostgreSQL spells it.
pub const NAME: &str = "information_schema";

const TABLES: [&str; 4] = ["tables", "columns", "schemata", "views"];

/// The `information_schema` schema over every catalog of a session.
#[derive(Debug)]
pub struct PgInformationSchema {
    catalogs: Arc<dyn CatalogProviderList>,
}

impl PgInformationSchema {
    pub fn new(catalogs: Arc<dyn CatalogProviderList>) -> Self {
        PgInformationSchema { catalogs }
    }
}

#[async_trait]
impl SchemaProvider for PgInformationSchema {
    fn table_names(&self) -> Vec<String> {
        TABLES.iter().map(|t| (*t).to_owned()).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        Ok(TABLES.contains(&name).then(|| {
            Arc::new(InfoTable {
                name: TABLES
                    .iter()
                    .find(|t| **t == name)
                    .copied()
                    .unwrap_or("tables"),
                catalogs: self.catalogs.clone(),
            }) as Arc<dyn TableProvider>
        }))
    }

    fn table_exist(&self, name: &str) -> bool {
        TABLES.contains(&name)
    }
}

#[derive(Debug)]
struct InfoTable {
    name: &'static str,
    catalogs: Arc<dyn CatalogProviderList>,
}

fn text(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn table_schema(name: &str) -> SchemaRef {
    Arc::new(Schema::new(match name {
        "columns" => vec![
            text("table_catalog"),
            text("table_schema"),
            text("table_name"),
            text("column_name"),
            Field::new("ordinal_position", DataType::Int32, false),
            text("column_default"),
            text("is_nullable"),
            text("data_type"),
            text("udt_name"),
        ],
        "schemata" => vec![
            text("catalog_name"),
            text("schema_name"),
            text("schema_owner"),
        ],
        "views" => vec![
            text("table_catalog"),
            text("table_schema"),
            text("table_name"),
            text("view_definition"),
        ],
        _ => vec![
            text("table_catalog"),
            text("table_schema"),
            text("table_name"),
            text("table_type"),
        ],
    }))
}

/// PostgreSQL's `data_type` and `udt_name` for an Arrow type.
pub fn pg_type(t: &DataType) -> (&'static str, String) {
    let (name, udt) = match t {
        DataType::Boolean => ("boolean", "bool"),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => ("smallint", "int2"),
        DataType::Int32 | DataType::UInt16 => ("integer", "int4"),
        DataType::Int64 | DataType::UInt32 => ("bigint", "int8"),
        DataType::UInt64 | DataType::Decimal128(..) | DataType::Decimal256(..) => {
            ("numeric", "numeric")
        }
        DataType::Float16 | DataType::Float32 => ("real", "float4"),
        DataType::Float64 => ("double precision", "float8"),
        DataType::Timestamp(_, Some(_)) => ("timestamp with time zone", "timestamptz"),
        DataType::Timestamp(_, None) => ("timestamp without time zone", "timestamp"),
        DataType::Date32 | DataType::Date64 => ("date", "date"),
        DataType::Time32(_) | DataType::Time64(_) => ("time without time zone", "time"),
        DataType::Interval(_) | DataType::Duration(TimeUnit::Microsecond) => {
            ("interval", "interval")
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => ("bytea", "bytea"),
        DataType::FixedSizeBinary(_) => ("bytea", "bytea"),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            return ("ARRAY", format!("_{}", pg_type(f.data_type()).1));
        }
        _ => ("text", "text"),
    };
    (name, udt.to_owned())
}

impl InfoTable {
    async fn batch(&self) -> Result<RecordBatch> {
        let schema = table_schema(self.name);
        let mut cols: Vec<StringBuilder> = (0..schema.fields().len())
            .map(|_| StringBuilder::new())
            .collect();
        let mut ordinal = Int32Builder::new();
        for catalog_name in self.catalogs.catalog_names() {
            let Some(catalog) = self.catalogs.catalog(&catalog_name) else {
                continue;
            };
            let mut schema_names = catalog.schema_names();
            if !schema_names.iter().any(|s| s == NAME) {
                schema_names.push(NAME.to_owned());
            }
            for schema_name in schema_names {
                if self.name == "schemata" {
                    cols[0].append_value(&catalog_name);
                    cols[1].append_value(&schema_name);
                    cols[2].append_value("driftline");
                    continue;
                }
                let tables: Vec<(String, Option<Arc<dyn TableProvider>>)> = if schema_name == NAME {
                    let mut v = Vec::new();
                    for t in TABLES {
                        v.push((
                            t.to_owned(),
                            Some(Arc::new(InfoTable {
                                name: t,
                                catalogs: self.catalogs.clone(),
                            }) as Arc<dyn TableProvider>),
                        ));
                    }
                    v
                } else {
                    let Some(schema) = catalog.schema(&schema_name) else {
                        continue;
                    };
                    let mut names = schema.table_names();
                    names.sort();
                    let mut v = Vec::new();
                    for name in names {
                        let table = schema.table(&name).await?;
                        v.push((name, table));
                    }
                    v
                };
                for (table_name, table) in tables {
                    let Some(table) = table else { continue };
                    match self.name {
                        "columns" => {
                            for (i, field) in table.schema().fields().iter().enumerate() {
                                let (data_type, udt) = pg_type(field.data_type());
                                cols[0].append_value(&catalog_name);
                                cols[1].append_value(&schema_name);
                                cols[2].append_value(&table_name);
                                cols[3].append_value(field.name());
                                ordinal.append_value(i32::try_from(i + 1).unwrap_or(i32::MAX));
                                cols[5].append_null();
                                cols[6].append_value(if field.is_nullable() {
                                    "YES"
                                } else {
                                    "NO"
                                });
                                cols[7].append_value(data_type);
                                cols[8].append_value(udt);
                            }
                        }
                        "views" => {
                            if table.table_type() == TableType::View {
                                cols[0].append_value(&catalog_name);
                                cols[1].append_value(&schema_name);
                                cols[2].append_value(&table_name);
                                cols[3].append_option(table.get_table_definition());
                            }
                        }
                        _ => {
                            cols[0].append_value(&catalog_name);
                            cols[1].append_value(&schema_name);
                            cols[2].append_value(&table_name);
                            cols[3].append_value(match table.table_type() {
                                TableType::View => "VIEW",
                                TableType::Temporary => "LOCAL TEMPORARY",
                                TableType::Base => "BASE TABLE",
                            });
                        }
                    }
                }
            }
        }
        let columns: Vec<ArrayRef> = cols
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                if self.name == "columns" && i == 4 {
                    Arc::new(ordinal.finish()) as ArrayRef
                } else {
                    Arc::new(b.finish()) as ArrayRef
                }
            })
            .collect();
        RecordBatch::try_new(schema, columns).map_err(DataFusionError::from)
    }
}

#[async_trait]
impl TableProvider for InfoTable {
    fn schema(&self) -> SchemaRef {
        table_schema(self.name)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = self.batch().await?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.schema(),
            projection.cloned(),
        )?)
    }
}
