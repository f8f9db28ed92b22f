//! What a client's statement may do, decided on its plan: the
//! [`QueryHandler`] the protocol layer talks to, and [`LakeQueries`], its
//! implementation over the lake's DataFusion session.
//!
//! A statement is planned with the connection's own settings (its time
//! zone) on a copy of the shared session's state, then checked by
//! [`read_only`]: an allow-list of the plan nodes that only read. A write
//! hidden anywhere in a plan (`EXPLAIN ANALYZE INSERT ...`, `SELECT ...
//! INTO`, `COPY (...) TO`, a `CREATE` inside a cursor) is refused before
//! anything runs, in both the simple and the extended protocol. Constants
//! larger than a few KiB are refused too (see [`Run::start`]).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::{FunctionRegistry, SessionState};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::{execute_stream, SendableRecordBatchStream};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;

use super::session::Session;
use crate::query::limits::VALUE_TOO_LARGE;

/// An error with the SQLSTATE a PostgreSQL client expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub code: &'static str,
    pub message: String,
}

impl SqlError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        SqlError {
            code,
            message: message.into(),
        }
    }

    /// SQLSTATE 25006: the endpoint only reads.
    pub fn read_only(what: &str) -> Self {
        SqlError::new(
            "25006",
            format!("the Driftline SQL endpoint is read-only: {what} is not allowed"),
        )
    }
}

/// `e` as the protocol's error (a function, where a generic context makes
/// `?` and `From` ambiguous).
pub fn pg_error(e: SqlError) -> datafusion_postgres::pgwire::error::PgWireError {
    e.into()
}

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        let code = match e.find_root() {
            DataFusionError::ResourcesExhausted(_) => "53200",
            DataFusionError::SQL(..) => "42601",
            DataFusionError::SchemaError(s, _) => match **s {
                datafusion::common::SchemaError::FieldNotFound { .. } => "42703",
                _ => "42P01",
            },
            DataFusionError::Plan(m) if m.contains("not found") => "42P01",
            DataFusionError::Plan(_) | DataFusionError::NotImplemented(_) => "0A000",
            root if root.to_string().contains(VALUE_TOO_LARGE) => "54000",
            _ => "XX000",
        };
        SqlError::new(code, e.to_string())
    }
}

/// Parse -> check -> plan -> execute, as the SQL endpoint needs it. The
/// protocol layer never sees a `SessionContext`: whatever it runs comes
/// through here, checked.
#[async_trait]
pub trait QueryHandler: Send + Sync {
    /// Plans `statement` as the connection with `session` runs it, and
    /// refuses (25006) anything but a read.
    async fn plan(&self, statement: &Statement, session: &Session)
        -> Result<LogicalPlan, SqlError>;

    /// Prepares `plan` (checked again; its parameters bound) to run with
    /// the connection's settings. Nothing runs until [`Run::start`].
    fn execute(&self, plan: LogicalPlan, session: &Session) -> Result<Run, SqlError>;
}

/// A checked plan, ready to run.
pub struct Run {
    state: SessionState,
    plan: LogicalPlan,
    max_literal_bytes: usize,
}

impl Run {
    /// The schema of the rows it returns.
    pub fn schema(&self) -> &datafusion::common::DFSchemaRef {
        self.plan.schema()
    }

    /// Optimises the plan, which computes its constant expressions, checks
    /// the constants, and starts it. This is CPU work: callers run it
    /// where it cannot hold up other work, under the statement's limits.
    pub async fn start(self) -> Result<SendableRecordBatchStream, SqlError> {
        let optimized = self.state.optimize(&self.plan)?;
        check_constants(&optimized, self.max_literal_bytes)?;
        let physical = self
            .state
            .query_planner()
            .create_physical_plan(&optimized, &self.state)
            .await?;
        Ok(execute_stream(physical, self.state.task_ctx())?)
    }
}

/// Refuses a plan with a constant larger than `max` bytes: a constant is
/// copied into every row of a batch (8,192 by default), so a 60 MB
/// constant over a table is 490 GB. The limit is the endpoint's value
/// limit divided by the batch size (64 MiB / 8,192 = 8 KiB by default).
fn check_constants(plan: &LogicalPlan, max: usize) -> Result<(), SqlError> {
    let mut largest = 0;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::Literal(v, _) = e {
                    largest = largest.max(v.size());
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    if largest > max {
        return Err(SqlError::new(
            "54000",
            format!(
                "{VALUE_TOO_LARGE}: a constant of {largest} bytes, more than the endpoint's limit of {max} bytes for a value repeated in every row"
            ),
        ));
    }
    Ok(())
}

/// The lake's tables, views and functions, read-only.
pub struct LakeQueries {
    ctx: Arc<SessionContext>,
    max_literal_bytes: usize,
}

impl LakeQueries {
    /// Queries over `ctx`, whose values are at most `max_value_bytes` (see
    /// [`crate::query::limits`]).
    pub fn new(ctx: Arc<SessionContext>, max_value_bytes: usize) -> Self {
        let batch = ctx.state().config().batch_size().max(1);
        LakeQueries {
            ctx,
            max_literal_bytes: (max_value_bytes / batch).max(1024),
        }
    }

    /// A copy of the shared state with the connection's settings; nothing
    /// a connection does reaches the shared session.
    fn state(&self, session: &Session) -> SessionState {
        let mut state = self.ctx.state();
        let tz = session.time_zone();
        if state.config().options().execution.time_zone.as_deref() != Some(tz) {
            state.config_mut().options_mut().execution.time_zone = Some(tz.to_owned());
            // Functions that read the time zone (now(), ...) are rebuilt,
            // as DataFusion does when its own SET changes it.
            let options = state.config().options().clone();
            let updated: Vec<_> = state
                .scalar_functions()
                .values()
                .filter_map(|udf| udf.inner().with_updated_config(&options).map(Arc::new))
                .collect();
            for udf in updated {
                let _ = state.register_udf(udf);
            }
        }
        state
    }
}

#[async_trait]
impl QueryHandler for LakeQueries {
    async fn plan(
        &self,
        statement: &Statement,
        session: &Session,
    ) -> Result<LogicalPlan, SqlError> {
        let state = self.state(session);
        let to_plan = |s: &Statement| {
            state.statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(
                s.clone(),
            )))
        };
        let mut planned = to_plan(statement).await;
        // DataFusion refuses an unaggregated correlated subquery while
        // planning or while analysing the plan (cheap: no constant is
        // computed there); a statement without subqueries is not analysed
        // here, only when it runs.
        let unaggregated = match &planned {
            Err(e) => e.to_string().contains(UNAGGREGATED_SUBQUERY),
            Ok(_) if !has_subquery(statement) => false,
            Ok(plan) => state
                .analyzer()
                .execute_and_check(plan.clone(), state.config_options(), |_, _| {})
                .is_err_and(|e| e.to_string().contains(UNAGGREGATED_SUBQUERY)),
        };
        if unaggregated {
            planned = to_plan(&aggregate_scalar_subqueries(statement.clone())).await;
        }
        match planned {
            Ok(plan) => {
                read_only(&plan)?;
                Ok(plan)
            }
            // A statement DataFusion cannot plan (COPY, GRANT, ...) never
            // runs; unless it is a query, say why it could not.
            Err(e) => match innermost(statement) {
                Statement::Query(_) => Err(e.into()),
                other => {
                    let text = other.to_string();
                    let verb: Vec<&str> = text.split_whitespace().take(2).collect();
                    Err(SqlError::read_only(&verb.join(" ").to_uppercase()))
                }
            },
        }
    }

    fn execute(&self, plan: LogicalPlan, session: &Session) -> Result<Run, SqlError> {
        read_only(&plan)?;
        Ok(Run {
            state: self.state(session),
            plan,
            max_literal_bytes: self.max_literal_bytes,
        })
    }
}

/// DataFusion's refusal of a correlated scalar subquery that is not an
/// aggregate, which PostgreSQL runs (and fails only if it returns more
/// than one row).
const UNAGGREGATED_SUBQUERY: &str = "Correlated scalar subquery must be aggregated";

/// The aggregate functions a scalar subquery's value may already be.
const AGGREGATES: [&str; 10] = [
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "first_value",
];

/// Whether every relation `statement` reads is one of the PostgreSQL
/// catalog's (`pg_catalog.*`, `pg_*`, `information_schema.*`).
fn catalog_only(statement: &Statement) -> bool {
    use datafusion::sql::sqlparser::ast::visit_relations;
    visit_relations(statement, |name| {
        let name = name.to_string().to_lowercase();
        let last = name.rsplit('.').next().unwrap_or_default();
        if name.starts_with("pg_catalog.")
            || name.starts_with("information_schema.")
            || last.starts_with("pg_")
        {
            std::ops::ControlFlow::Continue(())
        } else {
            std::ops::ControlFlow::Break(())
        }
    })
    .is_continue()
}

/// Whether a statement or an expression holds a subquery.
fn has_subquery(node: &impl datafusion::sql::sqlparser::ast::Visit) -> bool {
    use datafusion::sql::sqlparser::ast::{visit_expressions, Expr};
    visit_expressions(node, |e| match e {
        Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
            std::ops::ControlFlow::Break(())
        }
        _ => std::ops::ControlFlow::Continue(()),
    })
    .is_break()
}

/// Parses one SQL expression (PostgreSQL dialect).
pub(super) fn expression(sql: &str) -> Option<datafusion::sql::sqlparser::ast::Expr> {
    datafusion::sql::sqlparser::parser::Parser::new(
        &datafusion::sql::sqlparser::dialect::PostgreSqlDialect {},
    )
    .try_with_sql(sql)
    .and_then(|mut p| p.parse_expr())
    .ok()
}

/// Writes correlated scalar subqueries in forms DataFusion plans, for the
/// catalog questions drivers ask (SQLAlchemy's column reflection: a
/// column's default, collation and identity, each at most one row):
/// - `(SELECT e FROM ...)` whose value is not an aggregate as `(SELECT
///   max(e) FROM ...)`: the same answer for at most one row (PostgreSQL
///   fails on several rows; this takes the largest);
/// - in a statement that reads only the catalog, `CASE WHEN c THEN
///   (SELECT ...) END` (no other branch) as NULL (see below).
///
/// Used only when DataFusion refuses the statement as written.
fn aggregate_scalar_subqueries(mut statement: Statement) -> Statement {
    use datafusion::sql::sqlparser::ast::{
        visit_expressions_mut, Expr, SelectItem, SetExpr, Value,
    };
    let catalog_only = catalog_only(&statement);
    let _ = visit_expressions_mut(&mut statement, |e| {
        if let Expr::Case {
            operand: None,
            conditions,
            else_result,
            ..
        } = e
        {
            let no_else = match else_result.as_deref() {
                None => true,
                Some(Expr::Value(v)) => v.value == Value::Null,
                _ => false,
            };
            if let ([when], true) = (conditions.as_slice(), no_else) {
                // DataFusion decorrelates one level of simple predicates;
                // the catalog questions drivers ask this way (a column's
                // default, identity or collation) nest deeper. Driftline's
                // catalog has no defaults, identities, sequences or
                // collations: in a statement that reads only the catalog,
                // the answer is NULL.
                if catalog_only && has_subquery(&when.result) {
                    *e = Expr::Value(Value::Null.into());
                    return std::ops::ControlFlow::<()>::Continue(());
                }
            }
        }
        if let Expr::Subquery(query) = e {
            if let SetExpr::Select(select) = query.body.as_mut() {
                if let [SelectItem::UnnamedExpr(value)
                | SelectItem::ExprWithAlias { expr: value, .. }] =
                    select.projection.as_mut_slice()
                {
                    let aggregated = matches!(value, Expr::Function(f)
                        if AGGREGATES.contains(&f.name.to_string().to_lowercase().as_str()));
                    if !aggregated {
                        if let Some(wrapped) = expression(&format!("max({value})")) {
                            *value = wrapped;
                        }
                    }
                }
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    statement
}

/// The statement under any `EXPLAIN`.
fn innermost(statement: &Statement) -> &Statement {
    match statement {
        Statement::Explain { statement, .. } => innermost(statement),
        other => other,
    }
}

/// Accepts a plan only if every node in it, subqueries and the plans under
/// `EXPLAIN` included, is one that reads: an allow-list, so a node kind a
/// new DataFusion adds is refused until someone looks at it. DataFusion's
/// own check (no DDL, DML or statements) runs too.
pub fn read_only(plan: &LogicalPlan) -> Result<(), SqlError> {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(plan)
        .map_err(|e| SqlError::read_only(&kind_of_refusal(&e)))?;
    let mut refused = None;
    plan.apply_with_subqueries(|node| {
        let allowed = matches!(
            node,
            LogicalPlan::Projection(_)
                | LogicalPlan::Filter(_)
                | LogicalPlan::Window(_)
                | LogicalPlan::Aggregate(_)
                | LogicalPlan::Sort(_)
                | LogicalPlan::Join(_)
                | LogicalPlan::Repartition(_)
                | LogicalPlan::Union(_)
                | LogicalPlan::TableScan(_)
                | LogicalPlan::EmptyRelation(_)
                | LogicalPlan::Subquery(_)
                | LogicalPlan::SubqueryAlias(_)
                | LogicalPlan::Limit(_)
                | LogicalPlan::Values(_)
                | LogicalPlan::Explain(_)
                | LogicalPlan::Analyze(_)
                | LogicalPlan::Distinct(_)
                | LogicalPlan::Unnest(_)
                | LogicalPlan::RecursiveQuery(_)
                | LogicalPlan::DescribeTable(_)
        );
        if allowed {
            Ok(TreeNodeRecursion::Continue)
        } else {
            refused = Some(node_kind(node));
            Ok(TreeNodeRecursion::Stop)
        }
    })
    .map_err(SqlError::from)?;
    match refused {
        Some(kind) => Err(SqlError::read_only(&kind)),
        None => Ok(()),
    }
}

/// The statement kind DataFusion's check refused ("DDL not supported:
/// CreateMemoryTable" -> "CreateMemoryTable").
fn kind_of_refusal(e: &DataFusionError) -> String {
    let text = e.to_string();
    text.rsplit_once("not supported: ")
        .map_or(text.clone(), |(_, kind)| kind.trim().to_owned())
}

fn node_kind(node: &LogicalPlan) -> String {
    match node {
        LogicalPlan::Dml(d) => d.op.to_string(),
        LogicalPlan::Ddl(d) => d.name().to_owned(),
        LogicalPlan::Copy(_) => "COPY".to_owned(),
        LogicalPlan::Statement(s) => s.name().to_owned(),
        LogicalPlan::Extension(e) => e.node.name().to_owned(),
        other => other.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::dataframe::DataFrame;
    use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;

    /// The statement as the endpoint parses it.
    fn parse(sql: &str) -> Statement {
        PostgresCompatibilityParser::new()
            .parse(sql)
            .expect(sql)
            .remove(0)
    }

    async fn lake() -> LakeQueries {
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE metrics AS VALUES (1, 'a'), (2, 'b')")
            .await
            .expect("table")
            .collect()
            .await
            .expect("created");
        LakeQueries::new(Arc::new(ctx), 64 << 20)
    }

    async fn plan(lake: &LakeQueries, sql: &str) -> Result<LogicalPlan, SqlError> {
        lake.plan(&parse(sql), &Session::default()).await
    }

    #[tokio::test]
    async fn reads_are_planned() {
        let lake = lake().await;
        for sql in [
            "SELECT * FROM metrics",
            "SELECT column1, count(*) FROM metrics GROUP BY 1 ORDER BY 1 LIMIT 1",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
            "EXPLAIN SELECT * FROM metrics",
            "EXPLAIN ANALYZE SELECT * FROM metrics",
            "SELECT * FROM metrics WHERE column1 IN (SELECT 1) AND EXISTS (SELECT 1)",
            "SELECT unnest([1, 2])",
            "VALUES (1)",
        ] {
            plan(&lake, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[tokio::test]
    async fn writes_anywhere_in_a_plan_are_refused() {
        let lake = lake().await;
        for (sql, kind) in [
            ("INSERT INTO metrics VALUES (3, 'c')", "Insert"),
            (
                "EXPLAIN ANALYZE INSERT INTO metrics SELECT * FROM metrics LIMIT 3",
                "Insert",
            ),
            ("EXPLAIN INSERT INTO metrics VALUES (3, 'c')", "Insert"),
            (
                "COPY (SELECT 1) TO '/tmp/driftline-never-written.csv'",
                "COPY",
            ),
            (
                "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/driftline-never-written.csv'",
                "COPY",
            ),
            ("SELECT 42 AS answer INTO t", "CreateMemoryTable"),
            ("CREATE TABLE t AS SELECT 1", "CreateMemoryTable"),
            ("CREATE VIEW v AS SELECT 1", "CreateView"),
            ("DROP TABLE metrics", "DropTable"),
            ("DELETE FROM metrics", "Delete"),
            ("UPDATE metrics SET column2 = 'x'", "Update"),
            ("SET datafusion.execution.batch_size = 1", "SetVariable"),
        ] {
            let e = plan(&lake, sql).await.expect_err(sql);
            assert_eq!(e.code, "25006", "{sql}: {e}");
            assert!(e.message.contains(kind), "{sql}: {e}");
        }
        // Nothing was written.
        let rows = lake
            .ctx
            .sql("SELECT count(*) FROM metrics")
            .await
            .expect("count")
            .collect()
            .await
            .expect("rows");
        assert_eq!(rows[0].num_rows(), 1);
        assert!(lake.ctx.table("t").await.is_err());
        assert!(!std::path::Path::new("/tmp/driftline-never-written.csv").exists());
    }

    #[tokio::test]
    async fn correlated_scalar_subqueries_of_one_row_are_planned() {
        let lake = lake().await;
        let sql = "SELECT column2, CASE WHEN column1 > 0 THEN \
                   (SELECT m.column2 FROM metrics m WHERE m.column1 = o.column1) END AS same \
                   FROM metrics o ORDER BY 1";
        let planned = plan(&lake, sql).await.expect("rewritten and planned");
        let rows = DataFrame::new(lake.ctx.state(), planned)
            .collect()
            .await
            .expect("rows");
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&rows)
            .expect("format")
            .to_string();
        assert!(text.contains("| a       | a    |"), "{text}");
        assert!(text.contains("| b       | b    |"), "{text}");
        // In a question about the catalog alone, a CASE over a subquery
        // (SQLAlchemy's column default) is NULL: the catalog has none.
        let rewritten = aggregate_scalar_subqueries(parse(
            "SELECT a.attname, CASE WHEN a.atthasdef THEN (SELECT d.adbin FROM pg_catalog.pg_attrdef d \
             WHERE d.adrelid = a.attrelid) ELSE NULL END AS dflt FROM pg_catalog.pg_attribute a",
        ))
        .to_string();
        assert!(rewritten.contains("NULL AS dflt"), "{rewritten}");
        // Elsewhere it is left for DataFusion to refuse.
        let kept = aggregate_scalar_subqueries(parse(
            "SELECT CASE WHEN o.column1 > 1 THEN (SELECT m.column2 FROM metrics m) END FROM metrics o",
        ))
        .to_string();
        assert!(kept.contains("CASE WHEN"), "{kept}");
        // An aggregate is left as it is.
        plan(
            &lake,
            "SELECT (SELECT count(*) FROM metrics m WHERE m.column1 = o.column1) FROM metrics o",
        )
        .await
        .expect("aggregated subquery");
    }

    #[tokio::test]
    async fn each_connection_plans_in_its_own_time_zone() {
        let lake = lake().await;
        let statement = parse("SELECT now()");
        let mut session = Session::default();
        session.set_time_zone("-03:00");
        let local = lake.plan(&statement, &session).await.expect("plan");
        let utc = lake
            .plan(&statement, &Session::default())
            .await
            .expect("plan");
        let tz = |p: &LogicalPlan| p.schema().field(0).data_type().to_string();
        assert!(tz(&local).contains("-03:00"), "{}", tz(&local));
        assert!(!tz(&utc).contains("-03:00"), "{}", tz(&utc));
        // The shared session is unchanged.
        assert_ne!(
            lake.ctx
                .state()
                .config()
                .options()
                .execution
                .time_zone
                .as_deref(),
            Some("-03:00")
        );
    }
}
