//! A client of the REST API over the unix socket (or loopback TCP with a bearer token): hyper's
//! HTTP/1.1 client on a fresh connection per request. [`AsyncClient`] for async callers (the
//! load test), [`Client`] for blocking ones (`vgpuctl`, tests), with typed methods per
//! endpoint.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header;
use hyper::Request;
pub use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{
    AuditPage, AuditQuery, CreateVgpuRequest, DirtyLogRequest, DirtyLogState, DirtyPages,
    EngineInfo, EngineName, EngineUpdate, ErrorBody, GpuInfo, IncomingRequest, MigrateRequest,
    MigrationInfo, PolicyName, ProfileInfo, RestoreRequest, SchedUpdate, SnapshotRequest,
    SnapshotResult, TraceExport, TraceQuery, VgpuInfo, VgpuSched, VgpuStats,
};

/// Where the daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The unix socket.
    Unix(PathBuf),
    /// Loopback TCP with a bearer token.
    Tcp {
        /// Address.
        addr: SocketAddr,
        /// Token.
        token: String,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp { addr, .. } => write!(f, "http://{addr}"),
        }
    }
}

/// Errors of API calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "vgpud is not running (no socket at {0}); start it with `vgpud --api-socket {0}`, or \
         point --socket (or VGPUD_SOCKET) at its API socket"
    )]
    NotRunning(PathBuf),
    /// The socket exists but is not ours to use.
    #[error(
        "Permission denied on {0}: the API socket is mode 0600, run as the user vgpud runs as"
    )]
    PermissionDenied(PathBuf),
    /// Connecting failed otherwise.
    #[error("Cannot connect to vgpud at {endpoint}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with vgpud failed")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("Bad request")]
    Request(#[from] hyper::http::Error),
    /// The daemon answered with an error.
    #[error("{message} ({status} {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
    /// The reply did not parse.
    #[error("Unexpected reply from vgpud")]
    Decode(#[from] serde_json::Error),
    /// No reply in time.
    #[error("vgpud did not answer within {0:?}")]
    Timeout(Duration),
    /// The client's runtime could not start.
    #[error("Cannot start the client runtime")]
    Runtime(#[source] io::Error),
}

/// A raw response.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// Status.
    pub status: StatusCode,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// Body.
    pub body: Bytes,
}

impl RawResponse {
    /// The body as JSON `T`, or the API error the body describes.
    pub fn json<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        self.check()?;
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// `Ok` for 2xx; the API error otherwise.
    pub fn check(&self) -> Result<(), ClientError> {
        if self.status.is_success() {
            return Ok(());
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => (e.code, e.message),
            Err(_) => (
                "http".into(),
                String::from_utf8_lossy(&self.body).into_owned(),
            ),
        };
        Err(ClientError::Api {
            status: self.status.as_u16(),
            code,
            message,
        })
    }
}

/// Percent-encodes a path segment or query value (unreserved characters kept).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An async client.
#[derive(Clone, Debug)]
pub struct AsyncClient {
    endpoint: Endpoint,
    timeout: Duration,
}

impl AsyncClient {
    /// A client of `endpoint` with a 30 s timeout per request.
    pub fn new(endpoint: Endpoint) -> Self {
        AsyncClient {
            endpoint,
            timeout: Duration::from_secs(30),
        }
    }

    /// Sets the per-request timeout.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn connect_error(&self, e: io::Error) -> ClientError {
        match (&self.endpoint, e.kind()) {
            (Endpoint::Unix(p), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                ClientError::NotRunning(p.clone())
            }
            (Endpoint::Unix(p), io::ErrorKind::PermissionDenied) => {
                ClientError::PermissionDenied(p.clone())
            }
            _ => ClientError::Connect {
                endpoint: self.endpoint.to_string(),
                source: e,
            },
        }
    }

    /// Sends `method path` with an optional JSON body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Endpoint::Tcp { token, .. } = &self.endpoint {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                send(s, req).await?
            }
            Endpoint::Tcp { addr, .. } => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                send(s, req).await?
            }
        };
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(RawResponse {
            status,
            content_type,
            body,
        })
    }

    /// `GET path` as JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::GET, path, None).await?.json()
    }

    /// `method path` with a JSON body, answered with JSON.
    pub async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let b = serde_json::to_vec(body)?;
        self.request(method, path, Some(b)).await?.json()
    }
}

async fn send<S>(
    stream: S,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "API connection");
        }
    });
    Ok(sender.send_request(req).await?)
}

/// A blocking client with typed calls per endpoint.
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: AsyncClient,
}

impl Client {
    /// A client of `endpoint`.
    pub fn new(endpoint: Endpoint) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Client {
            rt,
            inner: AsyncClient::new(endpoint),
        })
    }

    /// A client of the unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Result<Self, ClientError> {
        Client::new(Endpoint::Unix(path.into()))
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        self.inner.endpoint()
    }

    /// Sets the per-request timeout (default 30 s; snapshots of large vGPUs take longer).
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.inner = self.inner.with_timeout(t);
        self
    }

    /// Sends a raw request.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        self.rt.block_on(self.inner.request(method, path, body))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.rt.block_on(self.inner.get(path))
    }

    fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.rt.block_on(self.inner.send_json(method, path, body))
    }

    fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request(Method::POST, path, None)?.json()
    }

    /// `GET /api/v1/gpu`.
    pub fn gpu(&self) -> Result<GpuInfo, ClientError> {
        self.get("/api/v1/gpu")
    }

    /// `GET /api/v1/profiles`.
    pub fn profiles(&self) -> Result<Vec<ProfileInfo>, ClientError> {
        self.get("/api/v1/profiles")
    }

    /// `GET /api/v1/vgpus`.
    pub fn list(&self) -> Result<Vec<VgpuInfo>, ClientError> {
        self.get("/api/v1/vgpus")
    }

    /// `POST /api/v1/vgpus`.
    pub fn create(&self, req: &CreateVgpuRequest) -> Result<VgpuInfo, ClientError> {
        self.send(Method::POST, "/api/v1/vgpus", req)
    }

    /// `GET /api/v1/vgpus/{id}`.
    pub fn vgpu(&self, key: &str) -> Result<VgpuInfo, ClientError> {
        self.get(&format!("/api/v1/vgpus/{}", encode(key)))
    }

    /// `DELETE /api/v1/vgpus/{id}[?force=true]`.
    pub fn delete(&self, key: &str, force: bool) -> Result<(), ClientError> {
        let q = if force { "?force=true" } else { "" };
        self.request(
            Method::DELETE,
            &format!("/api/v1/vgpus/{}{q}", encode(key)),
            None,
        )?
        .check()
    }

    /// `POST /api/v1/vgpus/{id}/pause`.
    pub fn pause(&self, key: &str) -> Result<VgpuInfo, ClientError> {
        self.post_empty(&format!("/api/v1/vgpus/{}/pause", encode(key)))
    }

    /// `POST /api/v1/vgpus/{id}/resume`.
    pub fn resume(&self, key: &str) -> Result<VgpuInfo, ClientError> {
        self.post_empty(&format!("/api/v1/vgpus/{}/resume", encode(key)))
    }

    /// `POST /api/v1/vgpus/{id}/reset`.
    pub fn reset(&self, key: &str) -> Result<VgpuInfo, ClientError> {
        self.post_empty(&format!("/api/v1/vgpus/{}/reset", encode(key)))
    }

    /// `GET /api/v1/vgpus/{id}/sched`.
    pub fn sched(&self, key: &str) -> Result<VgpuSched, ClientError> {
        self.get(&format!("/api/v1/vgpus/{}/sched", encode(key)))
    }

    /// `PUT /api/v1/vgpus/{id}/sched`.
    pub fn set_sched(&self, key: &str, upd: &SchedUpdate) -> Result<VgpuSched, ClientError> {
        self.send(
            Method::PUT,
            &format!("/api/v1/vgpus/{}/sched", encode(key)),
            upd,
        )
    }

    /// `GET /api/v1/vgpus/{id}/stats`.
    pub fn stats(&self, key: &str) -> Result<VgpuStats, ClientError> {
        self.get(&format!("/api/v1/vgpus/{}/stats", encode(key)))
    }

    /// `GET /api/v1/stats`.
    pub fn all_stats(&self) -> Result<Vec<VgpuStats>, ClientError> {
        self.get("/api/v1/stats")
    }

    /// `GET /api/v1/vgpus/{id}/audit`.
    pub fn audit(&self, key: &str, q: &AuditQuery) -> Result<AuditPage, ClientError> {
        let mut qs = Vec::new();
        if let Some(a) = q.after {
            qs.push(format!("after={a}"));
        }
        if let Some(l) = q.limit {
            qs.push(format!("limit={l}"));
        }
        if let Some(e) = q.engine {
            qs.push(format!("engine={e}"));
        }
        if let Some(r) = &q.reason {
            qs.push(format!("reason={}", encode(r)));
        }
        let q = if qs.is_empty() {
            String::new()
        } else {
            format!("?{}", qs.join("&"))
        };
        self.get(&format!("/api/v1/vgpus/{}/audit{q}", encode(key)))
    }

    /// `GET /api/v1/vgpus/{id}/display`: PNG bytes.
    pub fn display(&self, key: &str) -> Result<Vec<u8>, ClientError> {
        let r = self.request(
            Method::GET,
            &format!("/api/v1/vgpus/{}/display", encode(key)),
            None,
        )?;
        r.check()?;
        Ok(r.body.to_vec())
    }

    /// `GET /api/v1/engines`.
    pub fn engines(&self) -> Result<Vec<EngineInfo>, ClientError> {
        self.get("/api/v1/engines")
    }

    /// `PUT /api/v1/engines/{engine}`.
    pub fn set_policy(
        &self,
        engine: EngineName,
        policy: PolicyName,
    ) -> Result<EngineInfo, ClientError> {
        self.send(
            Method::PUT,
            &format!("/api/v1/engines/{engine}"),
            &EngineUpdate { policy },
        )
    }

    /// `GET /api/v1/scheduler/trace`.
    pub fn trace(&self, q: &TraceQuery) -> Result<TraceExport, ClientError> {
        let mut qs = Vec::new();
        if let Some(e) = q.engine {
            qs.push(format!("engine={e}"));
        }
        if let Some(v) = q.vgpu {
            qs.push(format!("vgpu={v}"));
        }
        let q = if qs.is_empty() {
            String::new()
        } else {
            format!("?{}", qs.join("&"))
        };
        self.get(&format!("/api/v1/scheduler/trace{q}"))
    }

    /// `POST /api/v1/vgpus/{id}/snapshot`: the daemon writes `path` (absolute).
    pub fn snapshot(&self, key: &str, path: &str) -> Result<SnapshotResult, ClientError> {
        self.send(
            Method::POST,
            &format!("/api/v1/vgpus/{}/snapshot", encode(key)),
            &SnapshotRequest { path: path.into() },
        )
    }

    /// `POST /api/v1/vgpus/restore`.
    pub fn restore(&self, req: &RestoreRequest) -> Result<VgpuInfo, ClientError> {
        self.send(Method::POST, "/api/v1/vgpus/restore", req)
    }

    /// `POST /api/v1/vgpus/{id}/migrate`.
    pub fn migrate(&self, key: &str, req: &MigrateRequest) -> Result<MigrationInfo, ClientError> {
        self.send(
            Method::POST,
            &format!("/api/v1/vgpus/{}/migrate", encode(key)),
            req,
        )
    }

    /// `POST /api/v1/migrations/incoming`.
    pub fn incoming(&self, req: &IncomingRequest) -> Result<MigrationInfo, ClientError> {
        self.send(Method::POST, "/api/v1/migrations/incoming", req)
    }

    /// `GET /api/v1/migrations`.
    pub fn migrations(&self) -> Result<Vec<MigrationInfo>, ClientError> {
        self.get("/api/v1/migrations")
    }

    /// `GET /api/v1/migrations/{mid}`.
    pub fn migration(&self, mid: u64) -> Result<MigrationInfo, ClientError> {
        self.get(&format!("/api/v1/migrations/{mid}"))
    }

    /// `DELETE /api/v1/migrations/{mid}`.
    pub fn cancel_migration(&self, mid: u64) -> Result<MigrationInfo, ClientError> {
        self.request(Method::DELETE, &format!("/api/v1/migrations/{mid}"), None)?
            .json()
    }

    /// `POST /api/v1/vgpus/{id}/dirty-log`.
    pub fn set_dirty_log(&self, key: &str, enabled: bool) -> Result<DirtyLogState, ClientError> {
        self.send(
            Method::POST,
            &format!("/api/v1/vgpus/{}/dirty-log", encode(key)),
            &DirtyLogRequest { enabled },
        )
    }

    /// `GET /api/v1/vgpus/{id}/dirty-log?gpa=&len=`: takes (clears) what it returns.
    pub fn take_dirty_log(&self, key: &str, gpa: u64, len: u64) -> Result<DirtyPages, ClientError> {
        self.get(&format!(
            "/api/v1/vgpus/{}/dirty-log?gpa={gpa}&len={len}",
            encode(key)
        ))
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let r = self.request(Method::GET, "/metrics", None)?;
        r.check()?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_encode_keeps_unreserved_escapes_rest() {
        assert_eq!(encode("vm-1_a.b~"), "vm-1_a.b~");
        assert_eq!(encode("a b/c?"), "a%20b%2Fc%3F");
    }

    #[test]
    fn test_client_missing_socket_says_not_running() {
        let c = Client::unix("/nonexistent/vgpud-test.sock").unwrap();
        let e = c.gpu().unwrap_err();
        assert!(matches!(e, ClientError::NotRunning(_)), "{e:?}");
        assert!(e.to_string().contains("vgpud is not running"));
    }
}
