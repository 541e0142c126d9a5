//! kube-proxy's per-Service health checks: for each LoadBalancer Service
//! with `externalTrafficPolicy: Local`, an HTTP server on its
//! `healthCheckNodePort` that tells the load balancer whether this node
//! has local endpoints (pkg/proxy/healthcheck/service_health.go).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::server::Health;

/// One Service's health check, as the model computes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckSpec {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Unique local ready endpoint IPs.
    pub local_endpoints: usize,
}

/// The health check servers, one per `healthCheckNodePort`.
pub struct HealthCheckServers {
    bind_ip: IpAddr,
    health: Arc<Health>,
    servers: BTreeMap<u16, Server>,
}

impl HealthCheckServers {
    /// `bind_ip`: the address to bind (0.0.0.0 in production). `health`:
    /// the proxy's health, reported as `serviceProxyHealthy`.
    pub fn new(bind_ip: IpAddr, health: Arc<Health>) -> Self {
        Self {
            bind_ip,
            health,
            servers: BTreeMap::new(),
        }
    }

    /// Makes the running servers match `specs` (inside a tokio runtime).
    /// Servers that stay are updated in place, so load balancers probing
    /// them never see a gap. Returns the ports that could not be served,
    /// with why; they are retried at the next sync.
    pub async fn sync(&mut self, specs: &[HealthCheckSpec]) -> Vec<(u16, String)> {
        let mut errors = Vec::new();
        let mut fail = |port: u16, message: String| {
            tracing::error!(port, error = %message, "failed to start health check");
            errors.push((port, message));
        };
        let mut wanted: BTreeMap<u16, &HealthCheckSpec> = BTreeMap::new();
        for spec in specs {
            if spec.port == 0 {
                fail(0, format!("{}: port 0 cannot be served", spec.key()));
            } else if let Some(first) = wanted.get(&spec.port) {
                let message = format!(
                    "{}: port already used by the health check of {}",
                    spec.key(),
                    first.key()
                );
                fail(spec.port, message);
            } else {
                wanted.insert(spec.port, spec);
            }
        }

        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|port| !wanted.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            if let Some(server) = self.servers.remove(&port) {
                let service = server.spec.lock().unwrap().key();
                tracing::info!(port, %service, "closing health check");
                server.close().await;
            }
        }

        for (port, spec) in wanted {
            if let Some(server) = self.servers.get(&port) {
                *server.spec.lock().unwrap() = spec.clone();
                continue;
            }
            let addr = SocketAddr::new(self.bind_ip, port);
            match Server::start(addr, spec, &self.health).await {
                Ok(server) => {
                    tracing::info!(port, service = %spec.key(), "serving health check");
                    self.servers.insert(port, server);
                }
                Err(err) => fail(
                    port,
                    format!(
                        "{}: cannot listen on {addr}: {err} (is another process using this port?)",
                        spec.key()
                    ),
                ),
            }
        }
        errors
    }

    /// The ports being served, ascending.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

impl HealthCheckSpec {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One port's server. Dropping it stops the server without waiting;
/// `close` also waits until the port is free.
struct Server {
    spec: Arc<Mutex<HealthCheckSpec>>,
    task: JoinHandle<()>,
    connections: Connections,
}

impl Server {
    async fn start(
        addr: SocketAddr,
        spec: &HealthCheckSpec,
        health: &Arc<Health>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let spec = Arc::new(Mutex::new(spec.clone()));
        let connections = Connections::default();
        let app = Router::new().fallback(answer).with_state(AppState {
            spec: spec.clone(),
            health: health.clone(),
        });
        let listener = TrackingListener {
            listener,
            connections: connections.clone(),
        };
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(%addr, error = %err, "health check server stopped");
            }
        });
        Ok(Self {
            spec,
            task,
            connections,
        })
    }

    async fn close(mut self) {
        self.task.abort();
        // Cancellation drops the listener only when the runtime gets to
        // it; wait, so the port is free when `sync` returns.
        let _ = (&mut self.task).await;
        self.connections.shut_down_all();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        self.connections.shut_down_all();
    }
}

#[derive(Clone)]
struct AppState {
    spec: Arc<Mutex<HealthCheckSpec>>,
    health: Arc<Health>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// Any method, any path, like kube-proxy.
async fn answer(State(s): State<AppState>) -> impl IntoResponse {
    let spec = s.spec.lock().unwrap().clone();
    let service_proxy_healthy = s.health.report(SystemTime::now(), true).healthy;
    let status = if spec.local_endpoints > 0 && service_proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&Answer {
        service: ServiceName {
            namespace: &spec.namespace,
            name: &spec.name,
        },
        local_endpoints: spec.local_endpoints,
        service_proxy_healthy,
    })
    .expect("serializing plain strings and numbers cannot fail");
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// Open connections of one server. axum serves each connection in its own
/// task, which aborting the server does not reach: it only starts hyper's
/// graceful shutdown, which waits forever for a client stalled in its
/// request. A duplicate of each socket lets `close` shut them all down.
#[derive(Clone, Default)]
struct Connections {
    open: Arc<Mutex<HashMap<u64, OwnedFd>>>,
    next_id: Arc<AtomicU64>,
}

impl Connections {
    fn track(&self, stream: TcpStream) -> TrackedStream {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => {
                self.open.lock().unwrap().insert(id, fd);
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot track health check connection; it will outlive its server");
            }
        }
        TrackedStream {
            stream,
            id,
            connections: self.clone(),
        }
    }

    fn shut_down_all(&self) {
        for (_, fd) in self.open.lock().unwrap().drain() {
            let _ = std::net::TcpStream::from(fd).shutdown(Shutdown::Both);
        }
    }
}

struct TrackingListener {
    listener: TcpListener,
    connections: Connections,
}

impl axum::serve::Listener for TrackingListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        (self.connections.track(stream), addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection that leaves its server's `Connections` when it ends.
struct TrackedStream {
    stream: TcpStream,
    id: u64,
    connections: Connections,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.connections.open.lock().unwrap().remove(&self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
