//! kproxy eBPF programs. Entry points stay thin: parse, then hand off to
//! the service path; every error ends in an explicit verdict.
#![no_std]
#![no_main]
// `asm!` for BPF: the placeholders in `skb.rs`.
#![feature(asm_experimental_arch)]

mod clock;
mod csum;
mod flow_cache;
mod frag;
mod icmp;
mod lb;
mod maps;
mod packet;
mod parse;
mod reject;
mod route;
mod service;
mod skb;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// tc ingress on pod-facing interfaces: Services for traffic from pods
/// (ClusterIP DNAT, hairpin SNAT), reverse NAT for replies from backends.
#[classifier]
pub fn kproxy_tc_pod(ctx: TcContext) -> i32 {
    service::handle::<_, false>(&ctx)
}

/// XDP on the external interfaces: NodePorts, LoadBalancer IPs and
/// externalIPs for traffic from outside, before the kernel stack sees it;
/// reverse NAT for replies arriving from other nodes.
#[xdp]
pub fn kproxy_xdp_external(ctx: XdpContext) -> u32 {
    service::handle::<_, true>(&ctx) as u32
}

/// tc ingress on the external interfaces: what XDP passed on (rejects,
/// fragments, ICMP errors, next hops without a neighbour entry yet), or
/// the whole external path when XDP is off.
#[classifier]
pub fn kproxy_tc_external(ctx: TcContext) -> i32 {
    service::handle::<_, true>(&ctx)
}

/// Attached nowhere: userspace test-runs it at load to learn how jiffies
/// map to CLOCK_MONOTONIC (`DatapathConfig::clock_tick_ns`), and at each
/// conntrack sweep to check it.
#[xdp]
pub fn kproxy_clock(ctx: XdpContext) -> u32 {
    clock::sample(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
