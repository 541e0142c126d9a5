//! The Service sets the bench programs: lab addresses only.

use super::*;

/// Filler VIPs stay below 198.19.255.0, filler endpoints below 198.18.254.0.
pub const FILLER_VIPS: usize = 255 * 256;
pub const FILLER_ENDPOINTS: usize = 254 * 256;
pub const POD_CIDR: &str = "198.18.0.0/16";

pub fn ipv4(ip: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(ip))
}

/// The n-th lab endpoint address (198.18.0.0 - 198.18.253.255, reused
/// modulo the range).
pub fn endpoint_ip(n: usize) -> [u8; 4] {
    let n = n % FILLER_ENDPOINTS;
    [198, 18, (n / 256) as u8, (n % 256) as u8]
}

/// The n-th Service's VIP and port: 65 280 addresses, then the next port.
pub fn service_vip(n: usize) -> ([u8; 4], u16) {
    let a = n % FILLER_VIPS;
    (
        [198, 19, (a / 256) as u8, (a % 256) as u8],
        80 + (n / FILLER_VIPS) as u16,
    )
}

pub fn frontend(name: String, backends: &[([u8; 4], u16)]) -> Frontend {
    let mut backends: Vec<Backend> = backends
        .iter()
        .map(|&(ip, port)| Backend {
            ip: ipv4(ip),
            port,
            terminating: false,
            local: false,
        })
        .collect();
    backends.sort();
    backends.dedup();
    Frontend::new(
        ServicePortName {
            namespace: "bench".to_owned(),
            name,
            port_name: "http".to_owned(),
        },
        FrontendKind::ClusterIp,
        backends,
    )
}

pub fn tcp_key(ip: [u8; 4], port: u16) -> FrontendKey {
    FrontendKey {
        ip: ipv4(ip),
        port,
        protocol: Protocol::Tcp,
    }
}

pub fn udp_key(ip: [u8; 4], port: u16) -> FrontendKey {
    FrontendKey {
        ip: ipv4(ip),
        port,
        protocol: Protocol::Udp,
    }
}

/// `services` Services with `endpoints` endpoints each, port 80 -> 8080.
pub fn filler_state(state: &mut DesiredState, services: usize, endpoints: usize) {
    for i in 0..services {
        let (vip, port) = service_vip(i);
        let backends: Vec<([u8; 4], u16)> = (0..endpoints)
            .map(|k| (endpoint_ip(i * endpoints + k), 8080))
            .collect();
        state
            .frontends
            .insert(tcp_key(vip, port), frontend(format!("svc-{i}"), &backends));
    }
}

/// Endpoint 0 of Service 0 in the two states one change toggles between:
/// every system starts in state 0, and change i goes to state (i + 1) % 2.
pub const CHANGED_ENDPOINTS: [[u8; 4]; 2] = [[198, 18, 254, 200], [198, 18, 254, 201]];
