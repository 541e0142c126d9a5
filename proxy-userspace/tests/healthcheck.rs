//! healthCheckNodePort servers, checked over real sockets on 127.0.0.1.
//!
//! Tests run on tokio's current-thread runtime: the servers only make
//! progress while the test awaits, so "the port is free when `sync`
//! returns" cannot pass by luck of a background thread. The blocking HTTP
//! client runs on `spawn_blocking` for the same reason.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proxy_userspace::healthcheck::{HealthCheckServers, HealthCheckSpec};
use proxy_userspace::server::Health;
use serde_json::json;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn spec(port: u16, name: &str, local_endpoints: usize) -> HealthCheckSpec {
    HealthCheckSpec {
        port,
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        local_endpoints,
    }
}

fn healthy() -> Arc<Health> {
    Arc::new(Health::new(Duration::from_secs(30)))
}

/// `n` distinct ports that were free a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((LOCALHOST, 0)).unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Syncs `make(ports)` on fresh ports, picking again if another process
/// took one of them in between.
async fn sync_on_free_ports(
    servers: &mut HealthCheckServers,
    n: usize,
    make: impl Fn(&[u16]) -> Vec<HealthCheckSpec>,
) -> Vec<u16> {
    for _ in 0..20 {
        let ports = free_ports(n);
        let errors = servers.sync(&make(&ports)).await;
        if errors.is_empty() {
            return ports;
        }
    }
    panic!("no free ports after 20 tries");
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A minimal HTTP/1.1 client over one kept-alive connection.
#[derive(Clone)]
struct Conn(Arc<Mutex<(TcpStream, Vec<u8>)>>);

impl Conn {
    fn open(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect((LOCALHOST, port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self(Arc::new(Mutex::new((stream, Vec::new())))))
    }

    async fn get(&self, path: &str) -> Response {
        let conn = self.0.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap();
            let (stream, buf) = &mut *guard;
            write!(stream, "GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                fill(stream, buf);
            };
            let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
            let mut lines = head.split("\r\n");
            let status = lines.next().unwrap().split(' ').nth(1).unwrap();
            let headers: Vec<(String, String)> = lines
                .map(|l| {
                    let (n, v) = l.split_once(':').unwrap();
                    (n.trim().to_owned(), v.trim().to_owned())
                })
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().unwrap())
                .expect("content-length");
            while buf.len() < head_end + 4 + len {
                fill(stream, buf);
            }
            let body = String::from_utf8(buf[head_end + 4..head_end + 4 + len].to_vec()).unwrap();
            buf.drain(..head_end + 4 + len);
            Response {
                status: status.parse().unwrap(),
                headers,
                body,
            }
        })
        .await
        .unwrap()
    }

    fn send_raw(&self, bytes: &[u8]) {
        self.0.lock().unwrap().0.write_all(bytes).unwrap();
    }

    /// Whether the server has closed this connection, waiting up to 1 s.
    /// Blocks the runtime's only thread on purpose: axum would also close
    /// idle connections of an aborted server, but only once its tasks run.
    fn closed_by_server_without_yielding(&self) -> bool {
        let mut guard = self.0.lock().unwrap();
        guard
            .0
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut byte = [0u8; 1];
        match guard.0.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ),
        }
    }
}

fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).expect("reading the response");
    assert!(n > 0, "connection closed mid-response: {buf:?}");
    buf.extend_from_slice(&chunk[..n]);
}

async fn get(port: u16, path: &str) -> Response {
    Conn::open(port).expect("connecting").get(path).await
}

#[tokio::test]
async fn serves_200_with_a_local_endpoint_and_kube_proxys_exact_body() {
    let mut servers = HealthCheckServers::new(LOCALHOST, healthy());
    let ports = sync_on_free_ports(&mut servers, 1, |p| vec![spec(p[0], "web", 1)]).await;
    assert_eq!(servers.ports(), ports);

    // kube-proxy answers on any path.
    for path in ["/", "/healthz", "/any/thing?x=1"] {
        let resp = get(ports[0], path).await;
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(
            resp.json(),
            json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 1,
                "serviceProxyHealthy": true,
            })
        );
        // Key order too, which the parsed comparison ignores.
        assert_eq!(
            resp.body,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}"#
        );
    }
}

#[tokio::test]
async fn serves_503_without_local_endpoints() {
    let mut servers = HealthCheckServers::new(LOCALHOST, healthy());
    let ports = sync_on_free_ports(&mut servers, 1, |p| vec![spec(p[0], "web", 0)]).await;

    let resp = get(ports[0], "/").await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        resp.body,
        r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":0,"serviceProxyHealthy":true}"#
    );
}

#[tokio::test]
async fn serves_503_when_the_proxy_is_unhealthy_even_with_local_endpoints() {
    let health = Arc::new(Health::new(Duration::from_millis(10)));
    health.queued(SystemTime::now() - Duration::from_secs(1));
    let mut servers = HealthCheckServers::new(LOCALHOST, health.clone());
    let ports = sync_on_free_ports(&mut servers, 1, |p| vec![spec(p[0], "web", 2)]).await;

    let resp = get(ports[0], "/").await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.json()["localEndpoints"], 2);
    assert_eq!(resp.json()["serviceProxyHealthy"], false);

    // Health is read at each request, not at sync.
    health.updated(SystemTime::now());
    let resp = get(ports[0], "/").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["serviceProxyHealthy"], true);
}

#[tokio::test]
async fn updates_apply_in_place_on_the_same_listener() {
    let mut servers = HealthCheckServers::new(LOCALHOST, healthy());
    let ports = sync_on_free_ports(&mut servers, 1, |p| vec![spec(p[0], "web", 2)]).await;
    let port = ports[0];
    // A kept-alive connection survives only if the server is not restarted.
    let conn = Conn::open(port).unwrap();
    let resp = conn.get("/").await;
    assert_eq!(
        (resp.status, resp.json()["localEndpoints"].clone()),
        (200, json!(2))
    );

    let errors = servers.sync(&[spec(port, "web", 0)]).await;
    assert!(errors.is_empty(), "{errors:?}");
    let resp = conn.get("/").await;
    assert_eq!(
        (resp.status, resp.json()["localEndpoints"].clone()),
        (503, json!(0))
    );

    // The port now belongs to another Service (names update in place too).
    let errors = servers.sync(&[spec(port, "api", 3)]).await;
    assert!(errors.is_empty(), "{errors:?}");
    let resp = conn.get("/").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.body,
        r#"{"service":{"namespace":"shop","name":"api"},"localEndpoints":3,"serviceProxyHealthy":true}"#
    );
    assert_eq!(servers.ports(), vec![port]);
}

#[tokio::test]
async fn a_removed_port_is_closed_when_sync_returns_and_can_come_back() {
    let mut servers = HealthCheckServers::new(LOCALHOST, healthy());
    let ports = sync_on_free_ports(&mut servers, 2, |p| {
        vec![spec(p[0], "web", 1), spec(p[1], "api", 1)]
    })
    .await;
    let (gone, kept) = (ports[0], ports[1]);
    // A client stalled in its first request: hyper's graceful shutdown,
    // which axum starts when its server is dropped, waits for it forever.
    let stalled = Conn::open(gone).unwrap();
    stalled.send_raw(b"GET / HTTP/1.1\r\nHost: lb\r\n");
    // Connections are accepted in order: once this one is answered, the
    // stalled one is accepted too.
    let conn = Conn::open(gone).unwrap();
    assert_eq!(conn.get("/").await.status, 200);

    let errors = servers.sync(&[spec(kept, "api", 1)]).await;
    assert!(errors.is_empty(), "{errors:?}");
    // No await in between: nothing else ran since `sync` returned.
    let refused = TcpStream::connect((LOCALHOST, gone));
    assert_eq!(
        refused.as_ref().map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    assert!(
        conn.closed_by_server_without_yielding(),
        "kept-alive connection to a removed health check stayed open"
    );
    assert!(
        stalled.closed_by_server_without_yielding(),
        "stalled connection to a removed health check stayed open"
    );
    assert_eq!(servers.ports(), vec![kept]);
    assert_eq!(get(kept, "/").await.status, 200);

    let errors = servers
        .sync(&[spec(kept, "api", 1), spec(gone, "web", 1)])
        .await;
    assert!(errors.is_empty(), "{errors:?}");
    let resp = get(gone, "/").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["service"]["name"], "web");
}

#[tokio::test]
async fn a_port_in_use_is_reported_others_still_serve_and_it_is_retried() {
    let blocker = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let blocked = blocker.local_addr().unwrap().port();
    let mut servers = HealthCheckServers::new(LOCALHOST, healthy());

    let mut attempt = 0;
    let (good, errors) = loop {
        attempt += 1;
        assert!(attempt <= 20, "no free port after 20 tries");
        let good = free_ports(1)[0];
        if good == blocked {
            continue;
        }
        let errors = servers
            .sync(&[spec(blocked, "web", 1), spec(good, "api", 1)])
            .await;
        if errors.iter().all(|(p, _)| *p == blocked) {
            break (good, errors);
        }
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, blocked);
    assert!(errors[0].1.contains("shop/web"), "{errors:?}");
    assert_eq!(servers.ports(), vec![good]);
    let resp = get(good, "/").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["service"]["name"], "api");

    // Once the port is free, the next sync takes it.
    drop(blocker);
    let errors = servers
        .sync(&[spec(blocked, "web", 1), spec(good, "api", 1)])
        .await;
    assert!(errors.is_empty(), "{errors:?}");
    let mut expected = vec![blocked, good];
    expected.sort();
    assert_eq!(servers.ports(), expected);
    let resp = get(blocked, "/").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["service"]["name"], "web");
}

#[tokio::test]
async fn two_services_on_one_port_are_reported_and_the_first_is_served() {
    let mut servers = HealthCheckServers::new(LOCALHOST, healthy());
    let mut attempt = 0;
    let (port, errors) = loop {
        attempt += 1;
        assert!(attempt <= 20, "no free port after 20 tries");
        let port = free_ports(1)[0];
        let errors = servers
            .sync(&[spec(port, "web", 1), spec(port, "api", 0)])
            .await;
        if servers.ports() == vec![port] {
            break (port, errors);
        }
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, port);
    assert!(errors[0].1.contains("shop/api"), "{errors:?}");
    let resp = get(port, "/").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["service"]["name"], "web");
}

#[test]
fn dropping_the_manager_frees_its_ports() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let port = runtime.block_on(async {
        let mut servers = HealthCheckServers::new(LOCALHOST, healthy());
        let ports = sync_on_free_ports(&mut servers, 1, |p| vec![spec(p[0], "web", 1)]).await;
        assert_eq!(get(ports[0], "/").await.status, 200);
        ports[0]
    });
    // Dropping cannot wait; the aborted tasks drop their listeners as soon
    // as the (still running) runtime gets to them.
    let freed = runtime.block_on(async {
        for _ in 0..100 {
            if TcpStream::connect(SocketAddr::from((LOCALHOST, port))).is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    });
    assert!(
        freed,
        "port {port} still served after the manager was dropped"
    );
}
