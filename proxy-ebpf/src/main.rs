//! kproxy eBPF programs. Entry points stay thin: parse, then hand off to
//! the service path; every error ends in an explicit verdict.
#![no_std]
#![no_main]

mod csum;
mod frag;
mod icmp;
mod lb;
mod maps;
mod parse;
mod pod;
mod reject;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

/// tc ingress on pod-facing interfaces: ClusterIP DNAT for traffic from
/// pods, reverse NAT for replies from backends.
#[classifier]
pub fn kproxy_tc_pod(ctx: TcContext) -> i32 {
    // An error here happens before any byte was rewritten: pass untouched.
    pod::handle(&ctx).unwrap_or(TC_ACT_OK as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
