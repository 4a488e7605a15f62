//! The REST API: axum on a unix socket (mode 0600) and optionally on a loopback TCP port with a
//! bearer token. Versioned paths under `/api/v1/`, plus `/metrics`.
//!
//! Request flow: the router picks a handler ([`handlers`]); the handler parses its inputs into
//! one [`action::ApiAction`]; [`AppState::run`] hands the action to [`action::dispatch`] on the
//! blocking thread pool; the reply (or an [`error::ApiError`]) becomes the response. Every
//! route is one line of [`routes`], which both builds the router and is checked against the
//! OpenAPI document ([`openapi`]).

pub mod action;
pub mod error;
pub mod handlers;
pub mod migrations;
pub mod openapi;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::Router;

use crate::daemon::Daemon;
use crate::metrics::ApiMetrics;
use action::{dispatch, ApiAction, ApiContext, ApiReply};
use error::ApiError;

/// Largest request body.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The unix socket could not be created.
    #[error("Cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another daemon answers on the socket.
    #[error("{0} is in use: is another vgpud running?")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// TCP is only offered on loopback addresses.
    #[error(
        "Refusing to serve the API on {0}: only loopback addresses (127.0.0.0/8, ::1) are allowed"
    )]
    NotLoopback(SocketAddr),
    /// TCP needs a token.
    #[error("Serving the API on TCP needs a bearer token (--api-token-file)")]
    TokenRequired,
    /// The TCP listener could not be created.
    #[error("Cannot listen on {addr}")]
    TcpBind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The runtime or the server failed.
    #[error("API server")]
    Io(#[from] io::Error),
}

/// Where and how the API is served.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The unix socket.
    pub socket: PathBuf,
    /// Optional loopback TCP address (port 0 picks one).
    pub tcp: Option<SocketAddr>,
    /// Bearer token required on TCP (the unix socket relies on its file mode).
    pub token: Option<String>,
    /// Utilisation sampling period (`busy_pct`).
    pub sample_period: Duration,
}

impl ApiConfig {
    /// The unix socket at `socket`, no TCP, one-second sampling.
    pub fn unix(socket: impl Into<PathBuf>) -> Self {
        ApiConfig {
            socket: socket.into(),
            tcp: None,
            token: None,
            sample_period: Duration::from_secs(1),
        }
    }
}

/// The default API socket: `$XDG_RUNTIME_DIR/vgpud.sock`, else `/run/vgpud.sock`.
pub fn default_socket() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR").map_or_else(
        || PathBuf::from("/run/vgpud.sock"),
        |d| PathBuf::from(d).join("vgpud.sock"),
    )
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState(Arc<ApiContext>);

impl AppState {
    /// State over `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Self {
        AppState(Arc::new(ApiContext {
            daemon,
            metrics: ApiMetrics::default(),
            migrations: migrations::Migrations::default(),
        }))
    }

    /// Runs `action` on the blocking pool.
    pub async fn run(&self, action: ApiAction) -> Result<ApiReply, ApiError> {
        let ctx = self.0.clone();
        tokio::task::spawn_blocking(move || dispatch(&ctx, action))
            .await
            .map_err(|e| ApiError::internal(format!("The request handler failed: {e}")))?
    }
}

/// One route: method, path (OpenAPI syntax) and handler.
pub struct Route {
    /// Method.
    pub method: Method,
    /// Path.
    pub path: &'static str,
    handler: MethodRouter<AppState>,
}

macro_rules! route {
    ($m:ident $path:literal => $h:path) => {
        Route {
            method: Method::$m,
            path: $path,
            handler: axum::routing::on(MethodFilter::$m, $h),
        }
    };
}

/// Every route.
pub fn routes() -> Vec<Route> {
    use handlers as h;
    vec![
        route!(GET "/api/v1/gpu" => h::get_gpu),
        route!(GET "/api/v1/profiles" => h::list_profiles),
        route!(GET "/api/v1/vgpus" => h::list_vgpus),
        route!(POST "/api/v1/vgpus" => h::create_vgpu),
        route!(GET "/api/v1/vgpus/{id}" => h::get_vgpu),
        route!(DELETE "/api/v1/vgpus/{id}" => h::delete_vgpu),
        route!(POST "/api/v1/vgpus/{id}/pause" => h::pause_vgpu),
        route!(POST "/api/v1/vgpus/{id}/resume" => h::resume_vgpu),
        route!(POST "/api/v1/vgpus/{id}/reset" => h::reset_vgpu),
        route!(GET "/api/v1/vgpus/{id}/sched" => h::get_sched),
        route!(PUT "/api/v1/vgpus/{id}/sched" => h::put_sched),
        route!(GET "/api/v1/vgpus/{id}/stats" => h::get_stats),
        route!(GET "/api/v1/vgpus/{id}/audit" => h::get_audit),
        route!(GET "/api/v1/vgpus/{id}/display" => h::get_display),
        route!(POST "/api/v1/vgpus/{id}/snapshot" => h::snapshot_vgpu),
        route!(POST "/api/v1/vgpus/restore" => h::restore_vgpu),
        route!(POST "/api/v1/vgpus/{id}/migrate" => h::migrate_vgpu),
        route!(POST "/api/v1/vgpus/{id}/dirty-log" => h::set_dirty_log),
        route!(GET "/api/v1/vgpus/{id}/dirty-log" => h::take_dirty_log),
        route!(POST "/api/v1/migrations/incoming" => h::start_incoming),
        route!(GET "/api/v1/migrations" => h::list_migrations),
        route!(GET "/api/v1/migrations/{mid}" => h::get_migration),
        route!(DELETE "/api/v1/migrations/{mid}" => h::cancel_migration),
        route!(GET "/api/v1/stats" => h::list_stats),
        route!(GET "/api/v1/engines" => h::list_engines),
        route!(PUT "/api/v1/engines/{engine}" => h::put_engine),
        route!(GET "/api/v1/scheduler/trace" => h::get_trace),
        route!(GET "/api/v1/openapi.json" => h::openapi),
        route!(GET "/metrics" => h::metrics),
    ]
}

async fn no_route(req: Request) -> ApiError {
    ApiError::not_found("no_route", format!("No route {}", req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn track(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let took = t0.elapsed();
    st.0.metrics.record(resp.status().as_u16(), took);
    tracing::debug!(%method, %path, status = resp.status().as_u16(), us = took.as_micros(), "api");
    resp
}

/// Compares in time independent of where the first difference is.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn bearer(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, t)| same_token(t.trim().as_bytes(), token.as_bytes()));
    if ok {
        return next.run(req).await;
    }
    let mut r = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Missing or wrong bearer token (Authorization: Bearer <token>)",
    )
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The router over `state` (no authentication: the unix socket's).
pub fn router(state: AppState) -> Router {
    let mut r: Router<AppState> = Router::new();
    for x in routes() {
        r = r.route(x.path, x.handler);
    }
    r.fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Binds the unix socket: a stale socket file is replaced, a live one refused; mode 0600.
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ServeError::NotASocket(path.into())),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::InUse(path.into())),
            Err(_) => std::fs::remove_file(path).map_err(bind_err)?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    l.set_nonblocking(true).map_err(bind_err)?;
    Ok(l)
}

/// A bound API server.
pub struct ApiServer {
    state: AppState,
    socket: PathBuf,
    unix: tokio::net::UnixListener,
    tcp: Option<(tokio::net::TcpListener, Arc<str>)>,
    sample_period: Duration,
}

impl ApiServer {
    /// Binds the listeners. Must run inside a tokio runtime.
    pub fn bind(daemon: Arc<Daemon>, cfg: &ApiConfig) -> Result<Self, ServeError> {
        let tcp = match cfg.tcp {
            None => None,
            Some(addr) => {
                if !addr.ip().is_loopback() {
                    return Err(ServeError::NotLoopback(addr));
                }
                let token: Arc<str> = cfg
                    .token
                    .as_deref()
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or(ServeError::TokenRequired)?
                    .into();
                let l = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| ServeError::TcpBind { addr, source })?;
                Some((tokio::net::TcpListener::from_std(l)?, token))
            }
        };
        let unix = bind_unix(&cfg.socket)?;
        let unix = match tokio::net::UnixListener::from_std(unix) {
            Ok(u) => u,
            Err(e) => {
                let _ = std::fs::remove_file(&cfg.socket);
                return Err(e.into());
            }
        };
        Ok(ApiServer {
            state: AppState::new(daemon),
            socket: cfg.socket.clone(),
            unix,
            tcp,
            sample_period: cfg.sample_period,
        })
    }

    /// The unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bound TCP address, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight and removes
    /// the socket file.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stop = move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let sampler = {
            let daemon = self.state.0.daemon.clone();
            let period = self.sample_period;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let d = daemon.clone();
                    let _ = tokio::task::spawn_blocking(move || d.sample_utilisation()).await;
                }
            })
        };
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        let app = router(self.state.clone());
        tracing::info!(socket = %self.socket.display(), "API listening");
        let unix = axum::serve(self.unix, app.clone()).with_graceful_shutdown(stop());
        let result = match self.tcp {
            Some((l, token)) => {
                tracing::info!(addr = ?l.local_addr().ok(), "API listening on TCP (bearer token)");
                let tcp_app = app.layer(middleware::from_fn_with_state(token, bearer));
                let tcp = axum::serve(l, tcp_app).with_graceful_shutdown(stop());
                let (a, b) = tokio::join!(unix, tcp);
                a.and(b)
            }
            None => unix.await,
        };
        sampler.abort();
        let _ = std::fs::remove_file(&self.socket);
        // Running migrations hold vGPUs: cancel them before the daemon shuts down.
        let ctx = self.state.0.clone();
        let _ = tokio::task::spawn_blocking(move || ctx.migrations.shutdown()).await;
        result.map_err(ServeError::Io)
    }
}

/// An API server on its own thread and runtime (for tests and embedding); stops on
/// [`ApiHandle::shutdown`] or drop.
pub struct ApiHandle {
    socket: PathBuf,
    tcp: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl ApiHandle {
    /// Binds and starts serving `daemon`.
    pub fn spawn(daemon: Arc<Daemon>, cfg: &ApiConfig) -> Result<ApiHandle, ServeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vgpud-api")
            .enable_all()
            .build()?;
        let server = rt.block_on(async { ApiServer::bind(daemon, cfg) })?;
        let (socket, tcp) = (server.socket().to_path_buf(), server.tcp_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vgpud-api-main".into())
            .spawn(move || {
                rt.block_on(server.serve(async {
                    let _ = rx.await;
                }))
            })?;
        Ok(ApiHandle {
            socket,
            tcp,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// The unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The TCP address, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Stops the server and waits for it.
    pub fn shutdown(mut self) -> Result<(), ServeError> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(ServeError::Io(io::Error::other("API thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use utoipa::OpenApi;

    use super::*;

    fn documented() -> BTreeSet<(String, String)> {
        let doc = openapi::ApiDoc::openapi();
        let mut out = BTreeSet::new();
        for (path, item) in &doc.paths.paths {
            let ops = [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("DELETE", &item.delete),
                ("PATCH", &item.patch),
                ("HEAD", &item.head),
                ("OPTIONS", &item.options),
                ("TRACE", &item.trace),
            ];
            for (m, op) in ops {
                if op.is_some() {
                    out.insert((m.to_string(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn test_openapi_documents_every_route_and_nothing_else() {
        let routed: BTreeSet<(String, String)> = routes()
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        assert_eq!(routed.len(), routes().len(), "a route is listed twice");
        let documented = documented();
        let missing: Vec<_> = routed.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "routes missing from the OpenAPI document: {missing:?}"
        );
        let extra: Vec<_> = documented.difference(&routed).collect();
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    }

    #[test]
    fn test_openapi_document_is_valid_json_with_schemas() {
        let v: serde_json::Value = serde_json::from_slice(openapi::document_json()).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3."));
        let schemas = v["components"]["schemas"].as_object().unwrap();
        for s in [
            "VgpuInfo",
            "CreateVgpuRequest",
            "ErrorBody",
            "VgpuStats",
            "AuditPage",
            "SnapshotRequest",
            "SnapshotResult",
            "RestoreRequest",
            "MigrateRequest",
            "IncomingRequest",
            "MigrationInfo",
            "MigrationReportInfo",
            "DirtyLogRequest",
            "DirtyPages",
        ] {
            assert!(schemas.contains_key(s), "schema {s} missing");
        }
        // Request bodies are strict.
        for s in [
            "CreateVgpuRequest",
            "SnapshotRequest",
            "RestoreRequest",
            "MigrateRequest",
            "IncomingRequest",
            "DirtyLogRequest",
        ] {
            assert_eq!(
                v["components"]["schemas"][s]["additionalProperties"],
                serde_json::Value::Bool(false),
                "{s}"
            );
        }
    }

    #[test]
    fn test_same_token_compares_whole_value() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
    }
}
