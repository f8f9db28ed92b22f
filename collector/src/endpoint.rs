//! The SQL endpoint: the PostgreSQL wire protocol over the same DataFusion
//! session as `driftline-collector query`, for psql, psycopg, JDBC and
//! Grafana's PostgreSQL data source.
//!
//! Protocol and query handling come from `datafusion-postgres` (and its
//! `pgwire`); this module adds what a shared, exposed service needs:
//! - SCRAM-SHA-256 password authentication against the configured users;
//! - optional TLS;
//! - read-only: every statement that is not a query is refused before it is
//!   planned (SQLSTATE 25006), and `SET` cannot change server settings;
//! - a per-statement time limit (SQLSTATE 57014) that also covers the rows
//!   still being streamed, and a memory limit (the session's memory pool);
//! - the client's cancel request (psql's Ctrl-C, psycopg's `cancel()`,
//!   tokio-postgres' `CancelToken`) stops the running statement the same
//!   way (SQLSTATE 57014, "canceling statement due to user request");
//! - a connection limit, answered with SQLSTATE 53300 like PostgreSQL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, QueryHook};
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::portal::Portal;
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{QueryResponse, Response};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, ConnectionManager, PgWireServerHandlers};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::data::DataRow;
use pgwire::messages::startup::SecretKey;
use pgwire::messages::PgWireBackendMessage;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// SCRAM iterations (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;

/// How the endpoint listens and what it allows.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    pub listen: SocketAddr,
    /// Users and their passwords. Never empty: every login needs a password.
    pub users: Vec<(String, String)>,
    /// PEM certificate chain and key: TLS is offered when set.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub max_connections: usize,
    /// Longest a statement may run, including sending its rows.
    pub statement_timeout: Duration,
}

/// Errors that keep the endpoint from starting.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot listen on {addr} for SQL: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("SQL endpoint TLS: {0}")]
    Tls(#[from] driftline_agent::tls::TlsError),
    #[error("SQL endpoint: at least one user with a password is required")]
    NoUsers,
}

/// Binds the endpoint; [`Endpoint::run`] then serves it. Binding first lets
/// callers print the address (and fail early when it is taken).
pub struct Endpoint {
    listener: TcpListener,
    handlers: Arc<Handlers>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    connections: Arc<Semaphore>,
    max_connections: usize,
}

impl Endpoint {
    pub async fn bind(
        ctx: Arc<SessionContext>,
        options: EndpointOptions,
    ) -> Result<Self, EndpointError> {
        if options.users.is_empty() || options.users.iter().any(|(_, p)| p.is_empty()) {
            return Err(EndpointError::NoUsers);
        }
        let tls = match &options.tls {
            Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(
                driftline_agent::tls::server_config(cert, key)?,
            )),
            None => None,
        };
        let listener =
            TcpListener::bind(options.listen)
                .await
                .map_err(|source| EndpointError::Bind {
                    addr: options.listen,
                    source,
                })?;
        let users = options
            .users
            .iter()
            .map(|(user, password)| {
                let salt: [u8; 16] = rand::random();
                let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
                (user.clone(), (salt.to_vec(), salted))
            })
            .collect();
        // ReadOnly first; then the library's own hooks (cursors, SET/SHOW,
        // transactions), as its `serve` installs them.
        use datafusion_postgres::hooks::{cursor, set_show, transactions};
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(ReadOnly),
            Arc::new(ShowSetting),
            Arc::new(cursor::CursorStatementHook),
            Arc::new(set_show::SetShowHook),
            Arc::new(transactions::TransactionStatementHook),
        ];
        let connections = Arc::new(ConnectionManager::new());
        let running = Arc::new(Running::default());
        let handlers = Arc::new(Handlers {
            session: Arc::new(Limited {
                inner: DfSessionService::new_with_hooks(ctx, hooks),
                timeout: options.statement_timeout,
                running: running.clone(),
            }),
            users: Arc::new(Users(users)),
            cancel: Arc::new(Cancel {
                running,
                pgwire: DefaultCancelHandler::new(connections.clone()),
            }),
            connections,
        });
        Ok(Endpoint {
            listener,
            handlers,
            tls,
            connections: Arc::new(Semaphore::new(options.max_connections)),
            max_connections: options.max_connections,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (mut socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "SQL endpoint: accept failed");
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                tracing::warn!(%peer, max = self.max_connections, "SQL connection refused: too many connections");
                tokio::spawn(async move {
                    let _ = socket.write_all(&too_many_connections()).await;
                    let _ = socket.shutdown().await;
                });
                continue;
            };
            let handlers = self.handlers.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                    tracing::debug!(%peer, error = %e, "SQL connection ended with an error");
                }
                drop(permit);
            });
        }
    }
}

/// An ErrorResponse, as PostgreSQL sends when `max_connections` is reached.
fn too_many_connections() -> Vec<u8> {
    use pgwire::messages::Message;
    let error = pgwire::messages::response::ErrorResponse::from(ErrorInfo::new(
        "FATAL".into(),
        "53300".into(),
        "sorry, too many clients already".into(),
    ));
    let mut buf = bytes::BytesMut::new();
    match error.encode(&mut buf) {
        Ok(()) => buf.to_vec(),
        Err(_) => Vec::new(),
    }
}

struct Handlers {
    session: Arc<Limited>,
    users: Arc<Users>,
    connections: Arc<ConnectionManager>,
    cancel: Arc<Cancel>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.session.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.session.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        // One per connection: the handler keeps the SASL exchange's state.
        let mut scram = ScramAuth::new(self.users.clone());
        scram.set_iterations(SCRAM_ITERATIONS);
        let parameters = DefaultServerParameterProvider::default();
        Arc::new(
            SASLAuthStartupHandler::new(Arc::new(parameters))
                .with_scram(scram)
                .with_connection_manager(self.connections.clone()),
        )
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }
}

/// The configured users, each with a salted SCRAM password.
#[derive(Debug)]
struct Users(std::collections::HashMap<String, (Vec<u8>, Vec<u8>)>);

#[async_trait]
impl AuthSource for Users {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        match self.0.get(user) {
            Some((salt, salted)) => Ok(Password::new(Some(salt.clone()), salted.clone())),
            None => Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".into(),
                "28P01".into(),
                format!("password authentication failed for user \"{user}\""),
            )))),
        }
    }
}

/// Refuses every statement that could change something.
struct ReadOnly;

impl ReadOnly {
    fn check(statement: &Statement) -> Option<PgWireError> {
        let refuse = |what: String| {
            // Counted here, where each refused statement passes once
            // (a statement refused at Parse never reaches Execute).
            metrics::counter!("driftline_sql_refused_total").increment(1);
            Some(PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "25006".into(),
                format!("the Driftline SQL endpoint is read-only: {what} is not allowed"),
            ))))
        };
        match statement {
            Statement::Query(_)
            | Statement::Explain { .. }
            | Statement::ExplainTable { .. }
            | Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowFunctions { .. }
            | Statement::ShowStatus { .. }
            | Statement::ShowCollation { .. }
            | Statement::ShowDatabases { .. }
            | Statement::ShowSchemas { .. }
            | Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Declare { .. }
            | Statement::Fetch { .. }
            | Statement::Close { .. }
            | Statement::Discard { .. } => None,
            // Session variables are per connection; server settings
            // (datafusion.*) are shared by every user and stay as configured.
            Statement::Set(Set::SingleAssignment { variable, .. })
                if variable
                    .to_string()
                    .to_lowercase()
                    .starts_with("datafusion.") =>
            {
                refuse(format!("SET {variable}"))
            }
            Statement::Set(_) => None,
            other => {
                let text = other.to_string();
                let verb: Vec<&str> = text.split_whitespace().take(2).collect();
                refuse(verb.join(" ").to_uppercase())
            }
        }
    }
}

#[async_trait]
impl QueryHook for ReadOnly {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &mut dyn datafusion_postgres::hooks::HookClient,
    ) -> Option<PgWireResult<Response>> {
        // Prepared statements live per connection in the protocol layer;
        // clients (psycopg) send DEALLOCATE ALL to reset them: nothing to do.
        if let Statement::Deallocate { .. } = statement {
            return Some(Ok(Response::Execution(pgwire::api::results::Tag::new(
                "DEALLOCATE",
            ))));
        }
        ReadOnly::check(statement).map(Err)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        ReadOnly::check(statement).map(Err)
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn datafusion_postgres::hooks::HookClient,
    ) -> Option<PgWireResult<Response>> {
        ReadOnly::check(statement).map(Err)
    }
}

/// `SHOW name` for the server settings `datafusion-postgres` does not know
/// (`SHOW timezone`, `SHOW server_encoding`, ...), from the same table as
/// `current_setting(name)`.
struct ShowSetting;

impl ShowSetting {
    fn respond(statement: &Statement, client: &(dyn ClientInfo + Send + Sync)) -> Option<Response> {
        let Statement::ShowVariable { variable } = statement else {
            return None;
        };
        let [name] = variable.as_slice() else {
            return None;
        };
        let name = name.value.to_lowercase();
        // A value the client SET in this session wins.
        let value = match client.metadata().get(&name) {
            Some(v) => v.clone(),
            None => crate::query::setting(&name)?.to_owned(),
        };
        use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo};
        let schema = Arc::new(vec![FieldInfo::new(
            name,
            None,
            None,
            pgwire::api::Type::TEXT,
            FieldFormat::Text,
        )]);
        let mut encoder = DataRowEncoder::new(schema.clone());
        encoder.encode_field(&Some(value)).ok()?;
        let row = encoder.take_row();
        Some(Response::Query(QueryResponse::new(
            schema,
            futures::stream::iter([Ok(row)]),
        )))
    }
}

#[async_trait]
impl QueryHook for ShowSetting {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        client: &mut dyn datafusion_postgres::hooks::HookClient,
    ) -> Option<PgWireResult<Response>> {
        ShowSetting::respond(statement, client).map(Ok)
    }

    async fn handle_extended_parse_query(
        &self,
        _statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        None
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        client: &mut dyn datafusion_postgres::hooks::HookClient,
    ) -> Option<PgWireResult<Response>> {
        ShowSetting::respond(statement, client).map(Ok)
    }
}

/// `DfSessionService` with a time limit over planning, execution and the
/// streaming of rows.
struct Limited {
    inner: DfSessionService,
    timeout: Duration,
    running: Arc<Running>,
}

/// DataFusion's "Resources exhausted" (the memory pool is full) as
/// PostgreSQL's out_of_memory (53200); other errors unchanged.
fn map_error(e: PgWireError) -> PgWireError {
    match e {
        PgWireError::ApiError(inner)
            if inner
                .downcast_ref::<datafusion::error::DataFusionError>()
                .is_some_and(|e| {
                    matches!(
                        e.find_root(),
                        datafusion::error::DataFusionError::ResourcesExhausted(_)
                    )
                }) =>
        {
            PgWireError::UserError(Box::new(ErrorInfo::new(
                "ERROR".into(),
                "53200".into(),
                inner.to_string(),
            )))
        }
        other => other,
    }
}

/// Counts an error of a statement that was let run (time-out, memory
/// limit, execution error) by SQLSTATE (`driftline_sql_errors_total`), and
/// passes it on. Refused writes have their own counter
/// (`driftline_sql_refused_total`); errors of the extended protocol's Parse
/// step (syntax, unknown table) are answered before any statement runs and
/// are not counted.
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

fn internal_error() -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        "XX000".into(),
        "internal error: the statement failed while producing rows".into(),
    )))
}

fn timed_out() -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        "57014".into(),
        "canceling statement due to statement timeout".into(),
    )))
}

fn canceled() -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        "57014".into(),
        "canceling statement due to user request".into(),
    )))
}

/// The statement each connection is running, by the process id and secret
/// key the client got at start-up, for cancel requests.
///
/// A PostgreSQL client cancels (psql's Ctrl-C) by opening a second
/// connection that sends those two. pgwire's own handler covers only
/// planning (`do_query`); most of a statement's work happens while its rows
/// stream, after `do_query` has returned, so [`Cancel`] also fires the
/// token registered here, which [`Limited::limit`] watches.
#[derive(Default)]
struct Running {
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
    fn start(self: &Arc<Self>, client: &impl ClientInfo) -> (CancellationToken, Arc<RunningGuard>) {
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

    fn cancel(&self, pid: i32, secret: &SecretKey) {
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

/// Cancel requests: the running statement's token, and pgwire's handler
/// (which interrupts planning).
struct Cancel {
    running: Arc<Running>,
    pgwire: DefaultCancelHandler,
}

#[async_trait]
impl CancelHandler for Cancel {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.running.cancel(request.pid, &request.secret_key);
        self.pgwire.on_cancel_request(request).await;
    }
}

impl Limited {
    /// Forwards the rows of a response from a task on the SQL runtime, so
    /// that a statement that computes for long without yielding cannot hold
    /// up the connection: at `deadline`, or when the client cancels, the
    /// client gets SQLSTATE 57014, the task is aborted and its plan dropped
    /// (which cancels it) at its next yield.
    fn limit(
        &self,
        response: Response,
        deadline: tokio::time::Instant,
        (cancel, running): (CancellationToken, Arc<RunningGuard>),
        span: tracing::Span,
    ) -> Response {
        let Response::Query(q) = response else {
            return response;
        };
        let tag = q.command_tag().to_owned();
        let schema = q.row_schema();
        let mut rows = q.data_rows;
        let (tx, rx) = tokio::sync::mpsc::channel::<PgWireResult<DataRow>>(64);
        let producer = sql_runtime().spawn(
            async move {
                use futures::StreamExt;
                while let Some(row) = rows.next().await {
                    if tx
                        .send(row.map_err(|e| counted(map_error(e))))
                        .await
                        .is_err()
                    {
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
                        None => match (&mut guard.0 .0).await {
                            Err(e) if e.is_panic() => Some((Err(counted(internal_error())), (rx, None))),
                            _ => None,
                        },
                    },
                    _ = tokio::time::sleep_until(deadline) => Some((Err(counted(timed_out())), (rx, None))),
                    _ = cancel.cancelled() => Some((Err(counted(canceled())), (rx, None))),
                }
            }
        });
        let mut limited = QueryResponse::new(schema, limited);
        limited.set_command_tag(&tag);
        Response::Query(limited)
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
/// DataFusion spawns while planning and starting a statement run there.
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

use std::future::Future;

#[async_trait]
impl SimpleQueryHandler for Limited {
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
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (cancel, running) = self.running.start(client);
        let span = statement_span("simple");
        let planned = tokio::time::timeout_at(
            deadline,
            OnSqlRuntime::new(SimpleQueryHandler::do_query(&self.inner, client, query))
                .instrument(span.clone()),
        );
        let responses = tokio::select! {
            planned = planned => planned.map_err(|_| counted(timed_out()))?,
            _ = cancel.cancelled() => return Err(counted(canceled())),
        }
        .map_err(|e| counted(map_error(e)))?;
        Ok(responses
            .into_iter()
            .map(|r| self.limit(r, deadline, (cancel.clone(), running.clone()), span.clone()))
            .collect())
    }
}

#[async_trait]
impl ExtendedQueryHandler for Limited {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = <DfSessionService as ExtendedQueryHandler>::QueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.inner.query_parser()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
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
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (cancel, running) = self.running.start(client);
        let span = statement_span("extended");
        let planned = tokio::time::timeout_at(
            deadline,
            OnSqlRuntime::new(ExtendedQueryHandler::do_query(
                &self.inner,
                client,
                portal,
                max_rows,
            ))
            .instrument(span.clone()),
        );
        let response = tokio::select! {
            planned = planned => planned.map_err(|_| counted(timed_out()))?,
            _ = cancel.cancelled() => return Err(counted(canceled())),
        }
        .map_err(|e| counted(map_error(e)))?;
        Ok(self.limit(response, deadline, (cancel, running), span))
    }
}
