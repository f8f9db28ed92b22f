//! The PostgreSQL protocol's query handling (simple and extended), over a
//! [`QueryHandler`].
//!
//! Each statement is parsed (PostgreSQL dialect, with
//! `datafusion-pg-catalog`'s rewrites for what clients send), then either
//! answered from the connection's settings ([`session`]), or planned and
//! checked by the handler and run under the statement's limits:
//! - a time limit (SQLSTATE 57014) over planning, optimising (where
//!   constant expressions are computed) and the streaming of rows;
//! - the client's cancel request (psql's Ctrl-C, psycopg's `cancel()`,
//!   tokio-postgres' `CancelToken`), answered the same way ("canceling
//!   statement due to user request");
//! - every CPU-bound step runs on a runtime of its own, so a statement
//!   that computes for long cannot hold up connections, ingest or timers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::{DFSchema, ParamValues};
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Declare, DeclareType, Statement};
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters_with_server_types;
use datafusion_postgres::arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch};
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, QueryHook};
use futures::StreamExt;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::messages::response::TransactionStatus;
use pgwire::messages::startup::SecretKey;
use pgwire::messages::PgWireBackendMessage;
use pgwire::types::format::FormatOptions;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::queries::{expression, pg_error, QueryHandler, SqlError};
use super::session::{self, Kind, Session};

/// A parsed statement with its plan, as the extended protocol stores it
/// (the type `datafusion-postgres`' cursors expect).
pub type Parsed = (String, Option<(Statement, LogicalPlan)>);

/// The query side of the endpoint: parses, dispatches and limits.
pub struct Service {
    handler: Arc<dyn QueryHandler>,
    parser: Arc<Parser>,
    /// The server's statement time limit; a connection may lower it.
    timeout: Duration,
    running: Arc<Running>,
}

impl Service {
    pub fn new(handler: Arc<dyn QueryHandler>, timeout: Duration, running: Arc<Running>) -> Self {
        // The library's parser serves only to describe plans (parameter
        // and result types); its session never sees a statement.
        let describe =
            DfSessionService::new_with_hooks(Arc::new(SessionContext::new()), Vec::new())
                .query_parser();
        Service {
            parser: Arc::new(Parser {
                handler: handler.clone(),
                sql: PostgresCompatibilityParser::new(),
                describe,
            }),
            handler,
            timeout,
            running,
        }
    }

    /// `DECLARE name CURSOR FOR query`: the query is planned, checked and
    /// started like any other, under the statement's limits (its rows
    /// must be fetched before the time limit), and kept in the
    /// connection's portal store, where `FETCH` and `CLOSE` find it.
    async fn declare(
        &self,
        client: &mut dyn HookClient,
        stmts: &[Declare],
        session: &Session,
        protocol: &'static str,
    ) -> PgWireResult<Response> {
        for declare in stmts {
            let syntax = |m: &str| pg_error(SqlError::new("42601", m));
            if declare.declare_type != Some(DeclareType::Cursor) {
                return Err(syntax("only DECLARE ... CURSOR FOR is supported"));
            }
            let (Some(name), Some(query)) = (declare.names.first(), &declare.for_query) else {
                return Err(syntax("DECLARE needs a cursor name and a FOR query"));
            };
            let statement = Statement::Query(query.clone());
            let limits = self.limits(&*client, session, protocol);
            let plan = self.plan(&statement, session, &limits).await?;
            let Response::Query(rows) = self
                .run(&*client, plan, &Format::UnifiedText, session, limits)
                .await?
            else {
                return Err(internal_error());
            };
            let stored =
                StoredStatement::new(name.value.clone(), (statement.to_string(), None), vec![]);
            let portal = Portal::new_cursor(name.value.clone(), Arc::new(stored));
            portal.start(rows).await;
            client.portal_store().put_portal(Arc::new(portal));
        }
        Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
    }

    /// Runs a checked plan under the statement's limits and streams its
    /// rows in `format`.
    async fn run(
        &self,
        client: &(impl ClientInfo + ?Sized),
        plan: LogicalPlan,
        format: &Format,
        session: &Session,
        limits: Limits,
    ) -> PgWireResult<Response> {
        let run = self.handler.execute(plan, session).map_err(pg_error)?;
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let fields = Arc::new(arrow_schema_to_pg_fields(
            run.schema().as_arrow(),
            format,
            Some(options),
        )?);
        // Optimising computes constant expressions, and starting a plan
        // can take long: both on the SQL runtime, under the limits.
        let start = AbortOnDrop(sql_runtime().spawn(run.start().instrument(limits.span.clone())));
        let stream = tokio::select! {
            started = start => match started {
                Ok(stream) => stream.map_err(|e| counted(pg_error(e)))?,
                Err(_) => return Err(counted(internal_error())),
            },
            _ = tokio::time::sleep_until(limits.deadline) => return Err(counted(timed_out())),
            _ = limits.cancel.cancelled() => return Err(counted(canceled())),
        };
        let row_fields = fields.clone();
        let rows = stream
            .map(
                move |batch| -> Box<dyn Iterator<Item = PgWireResult<DataRow>> + Send + Sync> {
                    match batch {
                        Ok(batch) => encode_recordbatch(row_fields.clone(), batch),
                        Err(e) => Box::new(std::iter::once(Err(SqlError::from(e).into()))),
                    }
                },
            )
            .flat_map(futures::stream::iter);
        Ok(Response::Query(limit(fields, rows, limits)))
    }

    /// The limits of a statement `client` starts now.
    fn limits(
        &self,
        client: &(impl ClientInfo + ?Sized),
        session: &Session,
        protocol: &'static str,
    ) -> Limits {
        let (cancel, running) = self.running.start(client);
        Limits {
            deadline: tokio::time::Instant::now() + session.statement_timeout(self.timeout),
            cancel,
            running,
            span: statement_span(protocol),
        }
    }

    /// Plans `statement` within `limits`.
    async fn plan(
        &self,
        statement: &Statement,
        session: &Session,
        limits: &Limits,
    ) -> PgWireResult<LogicalPlan> {
        let planned = tokio::time::timeout_at(
            limits.deadline,
            OnSqlRuntime::new(self.handler.plan(statement, session))
                .instrument(limits.span.clone()),
        );
        tokio::select! {
            planned = planned => match planned {
                Ok(plan) => Ok(plan.map_err(|e| counted(e.into()))?),
                Err(_) => Err(counted(timed_out())),
            },
            _ = limits.cancel.cancelled() => Err(counted(canceled())),
        }
    }
}

/// Parses `sql` as PostgreSQL (with `datafusion-pg-catalog`'s rewrites of
/// what clients send), and writes PostgreSQL's field access on a value,
/// `(f(x)).field`, which DataFusion does not plan, as `get_field(f(x),
/// 'field')` (PgJDBC's primary-key query uses it).
fn parse(parser: &PostgresCompatibilityParser, sql: &str) -> PgWireResult<Vec<Statement>> {
    use datafusion::sql::sqlparser::ast::{visit_expressions_mut, AccessExpr, Expr};
    let mut statements = parser
        .parse(&regproc_names(sql))
        .map_err(|e| pg_error(SqlError::new("42601", e.to_string())))?;
    for statement in &mut statements {
        let _ = visit_expressions_mut(statement, |e| {
            if let Some(rewritten) = int2vector(e) {
                *e = rewritten;
            }
            if let Expr::CompoundFieldAccess { root, access_chain } = e {
                if let ([AccessExpr::Dot(Expr::Identifier(field))], false) = (
                    access_chain.as_slice(),
                    matches!(**root, Expr::Identifier(_) | Expr::CompoundIdentifier(_)),
                ) {
                    let call = format!("get_field({root}, '{}')", field.value.replace('\'', "''"));
                    if let Some(rewritten) = expression(&call) {
                        *e = rewritten;
                    }
                }
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
    }
    Ok(statements)
}

/// `pg_index.indkey`, `indclass`, `indoption` and `indcollation` are
/// vectors of numbers, which the catalog keeps as text ("1 3"):
/// `unnest(indkey)` and `generate_subscripts(indkey, 1)` (SQLAlchemy's
/// constraint and index reflection) are written over their numbers.
fn int2vector(
    e: &datafusion::sql::sqlparser::ast::Expr,
) -> Option<datafusion::sql::sqlparser::ast::Expr> {
    use datafusion::sql::sqlparser::ast::{Expr, FunctionArguments};
    let Expr::Function(f) = e else {
        return None;
    };
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    let arg = list.args.first()?.to_string();
    let lower = arg.to_lowercase();
    if !["indkey", "indclass", "indoption", "indcollation"]
        .iter()
        .any(|c| lower.ends_with(c))
    {
        return None;
    }
    let numbers = format!("CAST(string_to_array({arg}, ' ') AS INT[])");
    match f.name.to_string().to_lowercase().as_str() {
        "unnest" if list.args.len() == 1 => expression(&format!("unnest({numbers})")),
        "generate_subscripts" => expression(&format!(
            "unnest(range(1, CAST(cardinality({numbers}) AS BIGINT) + 1))"
        )),
        _ => None,
    }
}

/// `'name'::regproc` as `'name'`: the catalog keeps function references
/// (`pg_type.typinput`, ...) as names, so comparing with the name is what
/// PgJDBC's `typinput = 'pg_catalog.array_in'::regproc` means; the
/// catalog's own rewrite to an OID subquery compares text with a number.
fn regproc_names(sql: &str) -> std::borrow::Cow<'_, str> {
    const CAST: &str = "'::regproc";
    let lower = sql.to_ascii_lowercase();
    let mut out = String::new();
    let mut copied = 0;
    for (end, _) in lower.match_indices(CAST) {
        let after = lower[end + CAST.len()..].chars().next();
        if after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') || end < copied {
            continue;
        }
        let Some(start) = sql[copied..end].rfind('\'').map(|i| i + copied) else {
            continue;
        };
        let name = &sql[start + 1..end];
        out.push_str(&sql[copied..start]);
        out.push('\'');
        out.push_str(name.strip_prefix("pg_catalog.").unwrap_or(name));
        out.push('\'');
        copied = end + CAST.len();
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(sql);
    }
    out.push_str(&sql[copied..]);
    std::borrow::Cow::Owned(out)
}

/// A transaction that failed accepts only its end (PostgreSQL's 25P02).
fn refuse_in_failed_transaction(
    client: &impl ClientInfo,
    statement: &Statement,
) -> PgWireResult<()> {
    if client.transaction_status() == TransactionStatus::Error
        && !session::ends_failed_transaction(statement)
    {
        return Err(SqlError::new(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        )
        .into());
    }
    Ok(())
}

#[async_trait]
impl SimpleQueryHandler for Service {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo
            + ClientPortalStore
            + futures::Sink<PgWireBackendMessage>
            + Unpin
            + Send
            + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as futures::Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = parse(&self.parser.sql, query)?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut responses = Vec::with_capacity(statements.len());
        for statement in statements {
            refuse_in_failed_transaction(client, &statement)?;
            let session = Session::of(client.metadata());
            let response = match session::kind(&statement) {
                Kind::Session => session::respond(client, &statement).await?,
                Kind::Cursor => match &statement {
                    Statement::Declare { stmts } => {
                        self.declare(client, stmts, &session, "simple").await?
                    }
                    // FETCH and CLOSE read the connection's portals only.
                    _ => CursorStatementHook
                        .handle_simple_query(&statement, &SessionContext::new(), client)
                        .await
                        .unwrap_or(Ok(Response::EmptyQuery))?,
                },
                Kind::Query => {
                    let limits = self.limits(client, &session, "simple");
                    let plan = self.plan(&statement, &session, &limits).await?;
                    self.run(client, plan, &Format::UnifiedText, &session, limits)
                        .await?
                }
            };
            responses.push(response);
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Service {
    type Statement = Parsed;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo
            + ClientPortalStore
            + futures::Sink<PgWireBackendMessage>
            + Unpin
            + Send
            + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as futures::Sink<PgWireBackendMessage>>::Error>,
    {
        let (_, Some((statement, plan))) = &portal.statement.statement else {
            return Ok(Response::EmptyQuery);
        };
        refuse_in_failed_transaction(client, statement)?;
        let session = Session::of(client.metadata());
        match session::kind(statement) {
            Kind::Session => session::respond(client, statement).await,
            Kind::Cursor => match statement {
                Statement::Declare { stmts } => {
                    self.declare(client, stmts, &session, "extended").await
                }
                _ => CursorStatementHook
                    .handle_extended_query(
                        statement,
                        plan,
                        &ParamValues::List(Vec::new()),
                        &SessionContext::new(),
                        client,
                    )
                    .await
                    .unwrap_or(Ok(Response::EmptyQuery)),
            },
            Kind::Query => {
                let limits = self.limits(client, &session, "extended");
                let params = self.parser.parameters(portal)?;
                let plan = plan
                    .clone()
                    .replace_params_with_values(&params)
                    .map_err(|e| counted(SqlError::from(e).into()))?;
                self.run(client, plan, &portal.result_column_format, &session, limits)
                    .await
            }
        }
    }
}

/// The extended protocol's Parse: statements are planned and checked when
/// they are prepared, and again when they run.
pub struct Parser {
    handler: Arc<dyn QueryHandler>,
    sql: PostgresCompatibilityParser,
    describe: Arc<datafusion_postgres::Parser>,
}

impl Parser {
    /// A portal's parameters as values of the types its plan expects.
    fn parameters(&self, portal: &Portal<Parsed>) -> PgWireResult<ParamValues> {
        let types = self.parameter_types(&portal.statement.statement)?;
        let inferred: Vec<Option<&DataType>> = types.iter().map(|(t, _)| t.as_ref()).collect();
        let wire: Vec<Option<&Type>> = types.iter().map(|(_, t)| Some(t)).collect();
        deserialize_parameters_with_server_types(portal, &inferred, &wire)
    }

    /// The type of each parameter `$1`, `$2`, ... by its number: a
    /// parameter the plan does not use (a rewrite dropped it) is UNKNOWN,
    /// so the others keep their places.
    fn parameter_types(&self, stmt: &Parsed) -> PgWireResult<Vec<(Option<DataType>, Type)>> {
        let (_, Some((_, plan))) = stmt else {
            return Ok(Vec::new());
        };
        let inferred = plan
            .get_parameter_types()
            .map_err(|e| pg_error(SqlError::from(e)))?;
        let mut inferred: Vec<(usize, Option<DataType>)> = inferred
            .into_iter()
            .filter_map(|(id, t)| Some((id.trim_start_matches('$').parse().ok()?, t)))
            .collect();
        inferred.sort_by_key(|(n, _)| *n);
        // The library's types are those of the plan's parameters in the
        // order of their numbers.
        let wire = self.describe.get_parameter_types(stmt)?;
        let count = inferred
            .last()
            .map_or(0, |(n, _)| *n)
            .min(u16::MAX as usize);
        let mut types = vec![(None, Type::UNKNOWN); count];
        for ((n, t), w) in inferred.into_iter().zip(wire) {
            if let Some(slot) = n.checked_sub(1).and_then(|i| types.get_mut(i)) {
                *slot = (t, w);
            }
        }
        Ok(types)
    }
}

/// A plan that produces no rows, with one text column per name: what a
/// session statement describes itself as.
fn placeholder_plan(columns: &[String]) -> PgWireResult<LogicalPlan> {
    let schema = Schema::new(
        columns
            .iter()
            .map(|c| Field::new(c, DataType::Utf8, false))
            .collect::<Vec<_>>(),
    );
    let schema = DFSchema::try_from(schema).map_err(|e| PgWireError::from(SqlError::from(e)))?;
    Ok(LogicalPlan::EmptyRelation(EmptyRelation {
        produce_one_row: false,
        schema: Arc::new(schema),
    }))
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Parsed;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Self::Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = parse(&self.sql, sql)?;
        if statements.len() > 1 {
            return Err(SqlError::new(
                "42601",
                "cannot insert multiple commands into a prepared statement",
            )
            .into());
        }
        let Some(statement) = statements.pop() else {
            return Ok(None);
        };
        let session = Session::of(client.metadata());
        let plan = match session::kind(&statement) {
            Kind::Session => placeholder_plan(&session::result_columns(&statement))?,
            // The cursor's query is planned and checked when it runs.
            Kind::Cursor => placeholder_plan(&[])?,
            Kind::Query => self
                .handler
                .plan(&statement, &session)
                .await
                .map_err(PgWireError::from)?,
        };
        Ok(Some((statement.to_string(), Some((statement, plan)))))
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        Ok(self
            .parameter_types(stmt)?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        self.describe.get_result_schema(stmt, column_format)
    }
}

/// What bounds one statement.
struct Limits {
    deadline: tokio::time::Instant,
    cancel: CancellationToken,
    running: Arc<RunningGuard>,
    span: tracing::Span,
}

/// Counts an error of a statement that was let run (time-out, memory
/// limit, execution error) by SQLSTATE (`driftline_sql_errors_total`), and
/// passes it on. Refused writes have their own counter
/// (`driftline_sql_refused_total`).
fn counted(e: PgWireError) -> PgWireError {
    let sqlstate = match &e {
        PgWireError::UserError(info) => info.code.clone(),
        PgWireError::ApiError(_) => "XX000".to_owned(),
        _ => "08000".to_owned(),
    };
    if sqlstate != "25006" {
        metrics::counter!("driftline_sql_errors_total", "sqlstate" => sqlstate).increment(1);
    }
    e
}

/// A statement's span: it lasts until its last row is sent.
fn statement_span(protocol: &'static str) -> tracing::Span {
    metrics::counter!("driftline_sql_statements_total", "protocol" => protocol).increment(1);
    tracing::info_span!("sql_statement", protocol)
}

fn error(code: &str, message: &str) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

fn internal_error() -> PgWireError {
    error(
        "XX000",
        "internal error: the statement failed while producing rows",
    )
}

fn timed_out() -> PgWireError {
    error("57014", "canceling statement due to statement timeout")
}

fn canceled() -> PgWireError {
    error("57014", "canceling statement due to user request")
}

/// The statement each connection is running, by the process id and secret
/// key the client got at start-up, for cancel requests.
///
/// A PostgreSQL client cancels (psql's Ctrl-C) by opening a second
/// connection that sends those two; the endpoint's cancel handler fires
/// the token registered here, which every step of the statement watches.
#[derive(Default)]
pub struct Running {
    statements: std::sync::Mutex<HashMap<(i32, Bytes), (u64, CancellationToken)>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// Unregisters a statement from [`Running`] when its rows are done.
struct RunningGuard {
    running: Arc<Running>,
    key: (i32, Bytes),
    id: u64,
}

impl Running {
    /// Registers the statement `client` starts now (replacing its previous
    /// one): its token fires on the client's cancel request.
    fn start(
        self: &Arc<Self>,
        client: &(impl ClientInfo + ?Sized),
    ) -> (CancellationToken, Arc<RunningGuard>) {
        let (pid, secret) = client.pid_and_secret_key();
        let key = (pid, secret.to_bytes());
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        if let Ok(mut statements) = self.statements.lock() {
            statements.insert(key.clone(), (id, token.clone()));
        }
        let guard = RunningGuard {
            running: self.clone(),
            key,
            id,
        };
        (token, Arc::new(guard))
    }

    /// Cancels the statement of the connection with this process id and
    /// secret key, if one runs.
    pub fn cancel(&self, pid: i32, secret: &SecretKey) {
        if let Ok(statements) = self.statements.lock() {
            if let Some((_, token)) = statements.get(&(pid, secret.to_bytes())) {
                token.cancel();
            }
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if let Ok(mut statements) = self.running.statements.lock() {
            if statements
                .get(&self.key)
                .is_some_and(|(id, _)| *id == self.id)
            {
                statements.remove(&self.key);
            }
        }
    }
}

/// Forwards `rows` from a task on the SQL runtime, so that a statement
/// that computes for long without yielding cannot hold up the connection:
/// at the deadline, or when the client cancels, the client gets SQLSTATE
/// 57014, the task is aborted and its plan dropped (which cancels it) at
/// its next yield.
fn limit(
    fields: Arc<Vec<FieldInfo>>,
    rows: impl futures::Stream<Item = PgWireResult<DataRow>> + Send + 'static,
    limits: Limits,
) -> QueryResponse {
    let Limits {
        deadline,
        cancel,
        running,
        span,
    } = limits;
    let (tx, rx) = tokio::sync::mpsc::channel::<PgWireResult<DataRow>>(64);
    let producer = sql_runtime().spawn(
        async move {
            futures::pin_mut!(rows);
            while let Some(row) = rows.next().await {
                if tx.send(row.map_err(counted)).await.is_err() {
                    break;
                }
            }
        }
        .instrument(span),
    );
    // The state holds the statement's registration until its last row.
    let state = (rx, Some((AbortOnDrop(producer), running)));
    let limited = futures::stream::unfold(state, move |(mut rx, guard)| {
        let cancel = cancel.clone();
        async move {
            let mut guard = guard?;
            tokio::select! {
                row = rx.recv() => match row {
                    Some(r) => Some((r, (rx, Some(guard)))),
                    // The producer is done: after its last row, or by a
                    // panic, which must not pass for a complete result.
                    None => match (&mut guard.0).await {
                        Err(e) if e.is_panic() => Some((Err(counted(internal_error())), (rx, None))),
                        _ => None,
                    },
                },
                _ = tokio::time::sleep_until(deadline) => Some((Err(counted(timed_out())), (rx, None))),
                _ = cancel.cancelled() => Some((Err(counted(canceled())), (rx, None))),
            }
        }
    });
    QueryResponse::new(fields, limited)
}

/// A task that is aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// The runtime SQL statements execute on, apart from the one that serves
/// connections, MQTT and timers: a CPU-bound query cannot starve those.
fn sql_runtime() -> tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            // More workers than cores: a statement that computes long
            // between two yields holds its workers until it yields, and the
            // next statements still find one.
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cores * 2 + 2)
                .thread_name("driftline-sql")
                .enable_all()
                .build()
                .ok()
        })
        .as_ref()
        .map_or_else(tokio::runtime::Handle::current, |rt| rt.handle().clone())
}

/// Polls a future with the SQL runtime as the current one, so the tasks
/// DataFusion spawns while planning run there.
struct OnSqlRuntime<F> {
    handle: tokio::runtime::Handle,
    inner: Pin<Box<F>>,
}

impl<F: Future> OnSqlRuntime<F> {
    fn new(inner: F) -> Self {
        OnSqlRuntime {
            handle: sql_runtime(),
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for OnSqlRuntime<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _runtime = self.handle.enter();
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regproc_literals_become_names() {
        assert_eq!(
            regproc_names("SELECT typinput='pg_catalog.array_in'::regproc AS a, 'boolin'::REGPROC, 'x'::regprocedure"),
            "SELECT typinput='array_in' AS a, 'boolin', 'x'::regprocedure"
        );
        assert_eq!(regproc_names("SELECT 1"), "SELECT 1");
    }

    #[test]
    fn field_access_on_a_value_becomes_get_field() {
        let statements = parse(
            &PostgresCompatibilityParser::new(),
            "SELECT (information_schema._pg_expandarray(i.indkey)).n FROM t i",
        )
        .expect("parse");
        let text = statements[0].to_string();
        assert!(
            text.contains("get_field((_pg_expandarray(i.indkey)), 'n')"),
            "{text}"
        );
    }
}
