//! The rules kube-proxy writes in iptables and nftables mode, generated
//! for the bench's Service sets.

use super::*;

/// A chain-name hash like kube-proxy's (16 base32-ish characters).
pub fn chain_hash(kind: &str, n: usize, ip: [u8; 4]) -> String {
    let mut x = (n as u64) ^ (u64::from(u32::from_be_bytes(ip)) << 20);
    for b in kind.bytes() {
        x = x.wrapping_mul(0x100_0000_01b3) ^ u64::from(b);
    }
    let mut out = String::with_capacity(16);
    for _ in 0..16 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 29;
        out.push(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[(x % 32) as usize] as char);
    }
    out
}

pub fn dotted(ip: [u8; 4]) -> String {
    Ipv4Addr::from(ip).to_string()
}

/// kube-proxy's rules for the control-plane set, and for one endpoint change.
pub struct RuleSets {
    /// Full `iptables-restore` input for state 0 and state 1.
    pub iptables_full: Vec<String>,
    /// `iptables-restore --noflush` inputs for one change (kube-proxy >= 1.28
    /// rewrites KUBE-SERVICES and only the changed Service's chains).
    pub iptables_partial: Vec<String>,
    pub nft_full: String,
    /// Incremental `nft -f` transactions for one change (nftables mode).
    pub nft_change: Vec<String>,
}

impl RuleSets {
    pub fn new(services: usize, endpoints: usize) -> Self {
        // The same endpoints as `cp_state`.
        let endpoint_sets = |variant: usize| -> Vec<Vec<[u8; 4]>> {
            (0..services)
                .map(|i| {
                    let mut eps: Vec<[u8; 4]> = (0..endpoints)
                        .map(|k| endpoint_ip(i * endpoints + k))
                        .collect();
                    if i == 0 {
                        eps[0] = CHANGED_ENDPOINTS[variant];
                    }
                    eps
                })
                .collect()
        };
        let states = [endpoint_sets(0), endpoint_sets(1)];
        // Index v: the full set of state v, or the change that leads to
        // state v from the other one.
        let other = |v: usize| CHANGED_ENDPOINTS[1 - v];
        Self {
            iptables_full: (0..2).map(|v| iptables_rules(&states[v], None)).collect(),
            iptables_partial: (0..2)
                .map(|v| iptables_rules(&states[v], Some(other(v))))
                .collect(),
            nft_full: nft_rules(&states[0]),
            nft_change: (0..2)
                .map(|v| nft_change_rules(&states[v][0], other(v)))
                .collect(),
        }
    }
}

pub fn svc_comment(i: usize) -> String {
    format!("bench/svc-{i}:http")
}

/// kube-proxy iptables mode (nat table, ClusterIP): KUBE-SERVICES ->
/// KUBE-SVC-* (masquerade off-cluster sources, then statistic random) ->
/// KUBE-SEP-* (hairpin masquerade, DNAT). With `partial = Some(old)`, only
/// KUBE-SERVICES and Service 0's chains, for `--noflush`, deleting the
/// chain of the endpoint `old`.
pub fn iptables_rules(sets: &[Vec<[u8; 4]>], partial: Option<[u8; 4]>) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut services = String::new();
    chains.push_str("*nat\n");
    if partial.is_none() {
        chains.push_str(
            ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
             :KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
        );
        rules.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
             -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        );
    }
    chains.push_str(":KUBE-SERVICES - [0:0]\n");
    for (i, eps) in sets.iter().enumerate() {
        let (vip, port) = service_vip(i);
        let (vip, comment) = (dotted(vip), svc_comment(i));
        let svc = format!("KUBE-SVC-{}", chain_hash("svc", i, [0; 4]));
        let _ = writeln!(
            services,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{comment} cluster IP\" -m tcp --dport {port} -j {svc}"
        );
        if partial.is_some() && i != 0 {
            continue;
        }
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {POD_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{comment} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
        );
        let n = eps.len();
        for (k, ep) in eps.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_hash("sep", i, *ep));
            let ep = dotted(*ep);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let probability = if k + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / (n - k) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{comment} -> {ep}:8080\"{probability} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {ep}/32 -m comment --comment {comment} -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment {comment} -m tcp -j DNAT --to-destination {ep}:8080"
            );
        }
    }
    if let Some(old) = partial {
        // Declaring a chain in a --noflush restore flushes it; a chain must
        // be empty to be deleted (kube-proxy does the same).
        let _ = writeln!(chains, ":KUBE-SEP-{} - [0:0]", chain_hash("sep", 0, old));
    }
    let mut out = chains;
    out.push_str(&services);
    out.push_str(&rules);
    if let Some(old) = partial {
        let _ = writeln!(out, "-X KUBE-SEP-{}", chain_hash("sep", 0, old));
    }
    out.push_str("COMMIT\n");
    out
}

pub const NFT_TABLE: &str = "ip kube-proxy";

pub fn nft_service_chain(i: usize) -> String {
    format!(
        "service-{}-bench-svc-{i}-tcp-http",
        &chain_hash("svc", i, [0; 4])[..8]
    )
}

pub fn nft_endpoint_chain(i: usize, ep: [u8; 4]) -> String {
    format!(
        "endpoint-{}-bench-svc-{i}-tcp-http__{}-8080",
        &chain_hash("sep", i, ep)[..8],
        dotted(ep)
    )
}

pub fn nft_service_rules(out: &mut String, i: usize, eps: &[[u8; 4]]) {
    let (vip, port) = service_vip(i);
    let chain = nft_service_chain(i);
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} ip daddr {} tcp dport {port} ip saddr != {POD_CIDR} jump mark-for-masquerade",
        dotted(vip)
    );
    let vmap: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(k, ep)| format!("{k} : goto {}", nft_endpoint_chain(i, *ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        vmap.join(" , ")
    );
}

pub fn nft_endpoint_rules(out: &mut String, i: usize, ep: [u8; 4]) {
    let chain = nft_endpoint_chain(i, ep);
    let ep = dotted(ep);
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} ip saddr {ep} jump mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} meta l4proto tcp dnat to {ep}:8080"
    );
}

/// kube-proxy nftables mode (ClusterIP): a `service-ips` verdict map from
/// VIP . protocol . port to per-Service chains, `numgen random mod N` vmaps
/// to per-endpoint chains, DNAT there.
pub fn nft_rules(sets: &[Vec<[u8; 4]>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "add table {NFT_TABLE}");
    let _ = writeln!(out, "add chain {NFT_TABLE} mark-for-masquerade");
    let _ = writeln!(out, "add chain {NFT_TABLE} masquerading {{ type nat hook postrouting priority srcnat ; policy accept ; }}");
    let _ = writeln!(out, "add chain {NFT_TABLE} services");
    let _ = writeln!(out, "add chain {NFT_TABLE} nat-prerouting {{ type nat hook prerouting priority dstnat ; policy accept ; }}");
    let _ = writeln!(out, "add chain {NFT_TABLE} nat-output {{ type nat hook output priority -100 ; policy accept ; }}");
    for (i, eps) in sets.iter().enumerate() {
        let _ = writeln!(out, "add chain {NFT_TABLE} {}", nft_service_chain(i));
        for ep in eps {
            let _ = writeln!(out, "add chain {NFT_TABLE} {}", nft_endpoint_chain(i, *ep));
        }
    }
    let _ = writeln!(out, "add map {NFT_TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}");
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} mark-for-masquerade mark set mark or 0x4000"
    );
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} masquerading mark and 0x4000 == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} masquerading mark set mark xor 0x4000"
    );
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} masquerading masquerade fully-random"
    );
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(out, "add rule {NFT_TABLE} nat-prerouting jump services");
    let _ = writeln!(out, "add rule {NFT_TABLE} nat-output jump services");
    for chunk in (0..sets.len()).collect::<Vec<_>>().chunks(1000) {
        let elements: Vec<String> = chunk
            .iter()
            .map(|&i| {
                let (vip, port) = service_vip(i);
                format!(
                    "{} . tcp . {port} : goto {}",
                    dotted(vip),
                    nft_service_chain(i)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "add element {NFT_TABLE} service-ips {{ {} }}",
            elements.join(" , ")
        );
    }
    for (i, eps) in sets.iter().enumerate() {
        nft_service_rules(&mut out, i, eps);
        for ep in eps {
            nft_endpoint_rules(&mut out, i, *ep);
        }
    }
    out
}

/// What kube-proxy's nftables mode sends for one endpoint change of
/// Service 0: the new endpoint chain, Service 0's chain rewritten, the old
/// endpoint chain deleted. One transaction.
pub fn nft_change_rules(eps: &[[u8; 4]], old: [u8; 4]) -> String {
    let mut out = String::new();
    let new = eps[0];
    let new_chain = nft_endpoint_chain(0, new);
    let _ = writeln!(out, "add chain {NFT_TABLE} {new_chain}");
    let _ = writeln!(out, "flush chain {NFT_TABLE} {new_chain}");
    nft_endpoint_rules(&mut out, 0, new);
    let _ = writeln!(out, "flush chain {NFT_TABLE} {}", nft_service_chain(0));
    nft_service_rules(&mut out, 0, eps);
    let _ = writeln!(
        out,
        "delete chain {NFT_TABLE} {}",
        nft_endpoint_chain(0, old)
    );
    out
}
