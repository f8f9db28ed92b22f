//! The SQL endpoint: the PostgreSQL wire protocol over the lake, for psql,
//! psycopg/SQLAlchemy/pandas, JDBC and Grafana's PostgreSQL data source.
//!
//! The protocol comes from `pgwire` (through `datafusion-postgres`); the
//! pieces are:
//! - this module: listening, TLS, SCRAM-SHA-256 logins and who gets a
//!   connection (see [`Endpoint::run`]);
//! - [`service`]: the protocol's query handling and each statement's time
//!   limit and cancellation;
//! - [`session`]: each connection's own settings (`SET`, `SHOW`, ...);
//! - [`queries`]: planning over the lake, and the read-only check on
//!   plans ([`queries::read_only`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use datafusion_postgres::pgwire;
use futures::Sink;
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth};
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::{ClientInfo, ConnectionManager, PgWireConnectionState, PgWireServerHandlers};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

pub mod queries;
pub mod service;
pub mod session;

use queries::LakeQueries;
use service::{Running, Service};

/// SCRAM iterations (PostgreSQL's default).
const SCRAM_ITERATIONS: usize = 4096;

/// How long a failed login waits before its error is sent: password
/// guessing gets one try per second per connection.
const FAILED_LOGIN_DELAY: Duration = Duration::from_secs(1);

/// Connections from one address that may be logging in at once; more are
/// closed at once. Logged-in connections do not count.
pub const MAX_PENDING_PER_ADDRESS: usize = 16;

/// Connections from all addresses that may be logging in at once.
pub const MAX_PENDING: usize = 256;

/// How the endpoint listens and what it allows.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    pub listen: SocketAddr,
    /// Users and their passwords. Never empty: every login needs a password.
    pub users: Vec<(String, String)>,
    /// PEM certificate chain and key: TLS is offered when set.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Logged-in connections at once.
    pub max_connections: usize,
    /// Longest a statement may run, including sending its rows.
    pub statement_timeout: Duration,
    /// How long a client has from connecting to being logged in.
    pub login_timeout: Duration,
    /// The largest value (text, list) one call of a SQL function may build.
    pub max_value_bytes: usize,
}

impl EndpointOptions {
    /// Options with the defaults `serve` uses for what is not given.
    pub fn new(listen: SocketAddr, users: Vec<(String, String)>) -> Self {
        EndpointOptions {
            listen,
            users,
            tls: None,
            max_connections: 64,
            statement_timeout: Duration::from_secs(60),
            login_timeout: Duration::from_secs(10),
            max_value_bytes: 64 << 20,
        }
    }
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
    Tls(#[from] driftline_runtime::tls::TlsError),
    #[error("SQL endpoint: at least one user with a password is required")]
    NoUsers,
}

/// Binds the endpoint; [`Endpoint::run`] then serves it. Binding first lets
/// callers print the address (and fail early when it is taken).
pub struct Endpoint {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    login_timeout: Duration,
}

/// What every connection of the endpoint shares.
struct Shared {
    service: Arc<Service>,
    users: Arc<Users>,
    connections: Arc<ConnectionManager>,
    cancel: Arc<Cancel>,
    /// One permit per logged-in connection.
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// Connections logging in, per address.
    pending: Mutex<HashMap<IpAddr, usize>>,
}

impl Endpoint {
    /// Binds the endpoint over `ctx`, the lake's session, which it keeps
    /// for itself: the functions that build large values are capped in it.
    pub async fn bind(
        ctx: Arc<SessionContext>,
        options: EndpointOptions,
    ) -> Result<Self, EndpointError> {
        if options.users.is_empty() || options.users.iter().any(|(_, p)| p.is_empty()) {
            return Err(EndpointError::NoUsers);
        }
        let tls = match &options.tls {
            Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(
                driftline_runtime::tls::server_config(cert, key)?,
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
        crate::query::limits::cap_values(&ctx, options.max_value_bytes);
        let connections = Arc::new(ConnectionManager::new());
        let running = Arc::new(Running::default());
        let shared = Arc::new(Shared {
            service: Arc::new(Service::new(
                Arc::new(LakeQueries::new(ctx, options.max_value_bytes)),
                options.statement_timeout,
                running.clone(),
            )),
            users: Arc::new(Users(users)),
            cancel: Arc::new(Cancel {
                running,
                pgwire: DefaultCancelHandler::new(connections.clone()),
            }),
            connections,
            slots: Arc::new(Semaphore::new(options.max_connections)),
            max_connections: options.max_connections,
            pending: Mutex::new(HashMap::new()),
        });
        Ok(Endpoint {
            listener,
            shared,
            tls,
            login_timeout: options.login_timeout,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until `shutdown`.
    ///
    /// A connection takes one of the `max_connections` slots only once its
    /// login succeeds; until then it is pending, and must log in within the
    /// login timeout. At most [`MAX_PENDING_PER_ADDRESS`] connections of
    /// one address, and [`MAX_PENDING`] in all, may be pending: idle
    /// sockets that never log in cannot lock the users out.
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
            let Some(pending) = Pending::admit(&self.shared, peer.ip()) else {
                tracing::warn!(%peer, "SQL connection refused: too many connections logging in");
                metrics::counter!("driftline_sql_refused_connections_total", "reason" => "pending")
                    .increment(1);
                tokio::spawn(async move {
                    let _ = socket
                        .write_all(&fatal_error_bytes(
                            "53300",
                            "sorry, too many clients are logging in",
                        ))
                        .await;
                    let _ = socket.shutdown().await;
                });
                continue;
            };
            let login = Arc::new(LoginState::default());
            let connection = Arc::new(Connection {
                shared: self.shared.clone(),
                login: login.clone(),
            });
            let tls = self.tls.clone();
            let login_timeout = self.login_timeout;
            tokio::spawn(async move {
                let served = pgwire::tokio::process_socket(socket, tls, connection);
                tokio::pin!(served);
                tokio::select! {
                    result = &mut served => {
                        drop(pending);
                        log_end(peer, result);
                        return;
                    }
                    _ = login.logged_in.notified() => drop(pending),
                    _ = tokio::time::sleep(login_timeout) => {
                        tracing::info!(%peer, "SQL connection closed: no login within {login_timeout:?}");
                        metrics::counter!("driftline_sql_refused_connections_total", "reason" => "login_timeout").increment(1);
                        return;
                    }
                }
                log_end(peer, served.await);
            });
        }
    }
}

fn log_end(peer: SocketAddr, result: std::io::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "SQL connection ended with an error");
    }
}

/// A connection that is logging in: counted per address until dropped.
struct Pending {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Pending {
    fn admit(shared: &Arc<Shared>, ip: IpAddr) -> Option<Pending> {
        let mut pending = shared.pending.lock().ok()?;
        let total: usize = pending.values().sum();
        let mine = pending.entry(ip).or_insert(0);
        if *mine >= MAX_PENDING_PER_ADDRESS || total >= MAX_PENDING {
            return None;
        }
        *mine += 1;
        metrics::gauge!("driftline_sql_connections", "state" => "pending").increment(1.0);
        Some(Pending {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        metrics::gauge!("driftline_sql_connections", "state" => "pending").decrement(1.0);
        if let Ok(mut pending) = self.shared.pending.lock() {
            if let Some(n) = pending.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    pending.remove(&self.ip);
                }
            }
        }
    }
}

/// One connection's handlers.
struct Connection {
    shared: Arc<Shared>,
    login: Arc<LoginState>,
}

/// Whether a connection logged in, and its slot once it has: released
/// when the connection ends.
#[derive(Default)]
struct LoginState {
    logged_in: Notify,
    slot: Mutex<Option<Slot>>,
}

/// A logged-in connection's slot.
struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Slot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        metrics::gauge!("driftline_sql_connections", "state" => "active").increment(1.0);
        Slot(permit)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("driftline_sql_connections", "state" => "active").decrement(1.0);
    }
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.shared.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.shared.service.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        // One per connection: the handler keeps the SASL exchange's state.
        let mut scram = ScramAuth::new(self.shared.users.clone());
        scram.set_iterations(SCRAM_ITERATIONS);
        let mut parameters = DefaultServerParameterProvider::default();
        parameters.server_version = crate::query::pg::SERVER_VERSION.to_owned();
        parameters.is_superuser = false;
        parameters.default_transaction_read_only = true;
        Arc::new(Login {
            sasl: SASLAuthStartupHandler::new(Arc::new(parameters))
                .with_scram(scram)
                .with_connection_manager(self.shared.connections.clone()),
            shared: self.shared.clone(),
            state: self.login.clone(),
        })
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.shared.cancel.clone()
    }
}

/// The login: SCRAM-SHA-256, then the connection's slot.
struct Login<H> {
    sasl: H,
    shared: Arc<Shared>,
    state: Arc<LoginState>,
}

#[async_trait]
impl<H: StartupHandler> StartupHandler for Login<H> {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let shared = &self.shared;
        let logging_in = matches!(
            client.state(),
            PgWireConnectionState::AuthenticationInProgress
        );
        // The slot is taken at the step that can complete the login, and
        // kept only if it does.
        let permit = if logging_in {
            match shared.slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    tracing::warn!(
                        max = shared.max_connections,
                        "SQL connection refused: too many connections"
                    );
                    metrics::counter!("driftline_sql_refused_connections_total", "reason" => "max_connections").increment(1);
                    return Err(fatal("53300", "sorry, too many clients already"));
                }
            }
        } else {
            None
        };
        let mut result = self.sasl.on_startup(client, message).await;
        if result.is_err() && logging_in {
            metrics::counter!("driftline_sql_failed_logins_total").increment(1);
            tokio::time::sleep(FAILED_LOGIN_DELAY).await;
            if let Err(PgWireError::InvalidPassword(_)) = result {
                // PostgreSQL's words, with the user's name.
                let user = client.metadata().get("user").cloned().unwrap_or_default();
                result = Err(fatal(
                    "28P01",
                    &format!("password authentication failed for user \"{user}\""),
                ));
            }
        } else if result.is_ok() && matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            if let Some(permit) = permit {
                session::adopt_startup_parameters(client.metadata_mut());
                if let Ok(mut slot) = self.state.slot.lock() {
                    *slot = Some(Slot::new(permit));
                }
                self.state.logged_in.notify_one();
            }
        }
        result
    }
}

fn fatal(code: &str, message: &str) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    )))
}

/// An ErrorResponse as bytes, for a socket the protocol never served.
fn fatal_error_bytes(code: &str, message: &str) -> Vec<u8> {
    use pgwire::messages::Message;
    let error = pgwire::messages::response::ErrorResponse::from(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    ));
    let mut buf = bytes::BytesMut::new();
    match error.encode(&mut buf) {
        Ok(()) => buf.to_vec(),
        Err(_) => Vec::new(),
    }
}

/// The configured users, each with a salted SCRAM password.
#[derive(Debug)]
struct Users(HashMap<String, (Vec<u8>, Vec<u8>)>);

#[async_trait]
impl AuthSource for Users {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        match self.0.get(user) {
            Some((salt, salted)) => Ok(Password::new(Some(salt.clone()), salted.clone())),
            None => Err(fatal(
                "28P01",
                &format!("password authentication failed for user \"{user}\""),
            )),
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
