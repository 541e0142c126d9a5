//! What the eBPF object cannot say for itself: the kernel-specific parts of
//! reading an skb's checksum state (`proxy-ebpf/src/skb.rs`).
//!
//! The tc programs read `skb->ip_summed` from the kernel's `struct sk_buff`
//! through the `bpf_cast_to_kern_ctx` kfunc. aya 0.14 emits neither a kfunc
//! call nor a CO-RE field offset, so the object carries placeholders: a
//! `call` whose immediate is [`KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER`], and a
//! one-byte load at offset [`SKB_IP_SUMMED_OFF_PLACEHOLDER`] followed by a
//! right shift by 0. Before the object is loaded, [`patch`] turns them into
//! the kfunc call (its BTF id in this kernel) and the load of the byte
//! holding `ip_summed` and its shift, from the running kernel's BTF
//! ([`SkbChecksumState::probe`]). Where that cannot be done, the call
//! becomes `r0 = 0`, and the programs update L4 checksums through the
//! `bpf_l4_csum_replace` helper, as they did before they could read the
//! state.

use std::path::Path;

use btf_rs::{Btf, Type};
use object::{Object as _, ObjectSection as _, SectionKind};
use proxy_common::{KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER, SKB_IP_SUMMED_OFF_PLACEHOLDER};
use thiserror::Error;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const CAST_TO_KERN_CTX: &str = "bpf_cast_to_kern_ctx";

/// BPF instruction encoding (include/uapi/linux/bpf.h).
const INSN_LEN: usize = 8;
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const LDX_B: u8 = 0x71; // BPF_LDX | BPF_MEM | BPF_B
const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const PSEUDO_KFUNC_CALL: u8 = 2;

#[derive(Debug, Error)]
pub enum KfuncError {
    #[error("reading the kernel's BTF ({VMLINUX_BTF}): {0}")]
    Btf(String),
    #[error("the kernel has no {CAST_TO_KERN_CTX} kfunc (Linux 6.3 or later has it)")]
    NoKfunc,
    #[error("struct sk_buff has no ip_summed field this datapath can read ({0})")]
    NoField(&'static str),
    #[error("the embedded eBPF object is not the ELF this kproxy was built with: {0}")]
    Object(String),
    #[error(
        "the embedded eBPF object has {calls} kfunc call and {loads} ip_summed load placeholders, not one of each per read; rebuild kproxy"
    )]
    Placeholders { calls: usize, loads: usize },
}

/// Where this kernel keeps an skb's checksum state, and how to reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkbChecksumState {
    /// BTF id of `bpf_cast_to_kern_ctx` in vmlinux.
    pub cast_to_kern_ctx: u32,
    /// Offset of the byte of `struct sk_buff` that holds `ip_summed`.
    pub byte: i16,
    /// `ip_summed`'s lowest bit in that byte.
    pub shift: u8,
}

impl SkbChecksumState {
    /// From the running kernel's BTF.
    pub fn probe() -> Result<Self, KfuncError> {
        Self::from_btf(&Btf::from_file(Path::new(VMLINUX_BTF)).map_err(btf_error)?)
    }

    fn from_btf(btf: &Btf) -> Result<Self, KfuncError> {
        let cast_to_kern_ctx = btf
            .resolve_ids_by_name(CAST_TO_KERN_CTX)
            .map_err(btf_error)?
            .into_iter()
            .find(|id| matches!(btf.resolve_type_by_id(*id), Ok(Type::Func(_))))
            .ok_or(KfuncError::NoKfunc)?;
        let sk_buff = btf
            .resolve_types_by_name("sk_buff")
            .map_err(btf_error)?
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .ok_or(KfuncError::NoField("no struct sk_buff"))?;
        let (bit, size) = find_member(btf, &sk_buff, "ip_summed", 0, 4)?
            .ok_or(KfuncError::NoField("not found"))?;
        if size != Some(2) {
            return Err(KfuncError::NoField("not a 2-bit field"));
        }
        let (byte, shift) = (bit / 8, (bit % 8) as u8);
        if shift > 6 {
            return Err(KfuncError::NoField("it straddles two bytes"));
        }
        let byte = i16::try_from(byte).map_err(|_| KfuncError::NoField("offset out of range"))?;
        Ok(Self {
            cast_to_kern_ctx,
            byte,
            shift,
        })
    }
}

fn btf_error(e: btf_rs::Error) -> KfuncError {
    KfuncError::Btf(e.to_string())
}

/// The bit offset (from the start of the outermost struct) and bitfield
/// size of member `name` of `ty`, looking into its anonymous struct and
/// union members (`struct_group` puts `ip_summed` in one), `depth` levels
/// at most.
fn find_member(
    btf: &Btf,
    ty: &btf_rs::Struct,
    name: &str,
    base: u32,
    depth: u32,
) -> Result<Option<(u32, Option<u32>)>, KfuncError> {
    for member in &ty.members {
        let bit = base + member.bit_offset();
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            return Ok(Some((bit, member.bitfield_size().filter(|s| *s != 0))));
        }
        if member_name.is_empty() && depth > 0 {
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(member) {
                if let Some(found) = find_member(btf, &inner, name, bit, depth - 1)? {
                    return Ok(Some(found));
                }
            }
        }
    }
    Ok(None)
}

/// `object` with its placeholders patched for `state` (`None`: the helper
/// path, see the module documentation). 8-byte aligned, as aya parses it.
pub fn patch(object: &[u8], state: Option<&SkbChecksumState>) -> Result<Vec<u64>, KfuncError> {
    let mut words = vec![0u64; object.len().div_ceil(INSN_LEN)];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    bytes[..object.len()].copy_from_slice(object);
    let text: Vec<(usize, usize)> = {
        let file = object::File::parse(object).map_err(|e| KfuncError::Object(e.to_string()))?;
        file.sections()
            .filter(|s| s.kind() == SectionKind::Text)
            .filter_map(|s| s.file_range())
            .map(|(start, len)| (start as usize, len as usize))
            .collect()
    };
    let (mut calls, mut loads) = (0, 0);
    for (start, len) in text {
        let section = bytes
            .get_mut(start..start + len)
            .ok_or_else(|| KfuncError::Object("a section past the end".into()))?;
        let count = section.len() / INSN_LEN;
        for i in 0..count {
            let insn = &section[i * INSN_LEN..(i + 1) * INSN_LEN];
            if is_call_placeholder(insn) {
                calls += 1;
                let insn = &mut section[i * INSN_LEN..(i + 1) * INSN_LEN];
                match state {
                    // call kfunc: src_reg = BPF_PSEUDO_KFUNC_CALL, imm = BTF id
                    // (off 0: vmlinux's BTF).
                    Some(s) => {
                        insn[1] = PSEUDO_KFUNC_CALL << 4;
                        insn[4..8].copy_from_slice(&s.cast_to_kern_ctx.to_le_bytes());
                    }
                    // r0 = 0
                    None => insn.copy_from_slice(&[MOV_K, 0, 0, 0, 0, 0, 0, 0]),
                }
            } else if is_load_placeholder(insn) {
                let (byte, shift) = state.map_or((0, 0), |s| (s.byte, s.shift));
                let next = section
                    .get_mut((i + 1) * INSN_LEN..(i + 2) * INSN_LEN)
                    .filter(|n| n[0] == RSH_K && n[4..8] == [0; 4])
                    .ok_or(KfuncError::Placeholders { calls, loads })?;
                next[4..8].copy_from_slice(&i32::from(shift).to_le_bytes());
                loads += 1;
                section[i * INSN_LEN + 2..i * INSN_LEN + 4].copy_from_slice(&byte.to_le_bytes());
            }
        }
    }
    if calls == 0 || calls != loads {
        return Err(KfuncError::Placeholders { calls, loads });
    }
    Ok(words)
}

fn is_call_placeholder(insn: &[u8]) -> bool {
    insn[0] == CALL
        && insn[1] == 0
        && insn[2..4] == [0, 0]
        && insn[4..8] == KFUNC_CAST_TO_KERN_CTX_PLACEHOLDER.to_le_bytes()
}

fn is_load_placeholder(insn: &[u8]) -> bool {
    insn[0] == LDX_B && insn[2..4] == SKB_IP_SUMMED_OFF_PLACEHOLDER.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_says_where_ip_summed_is() {
        // Linux 6.3 and later, with BTF: what CI and the lab run on.
        let state = SkbChecksumState::probe().expect("this kernel has BTF and the kfunc");
        assert!(state.cast_to_kern_ctx > 0);
        // `ip_summed` sits in the byte at `__pkt_type_offset` after three
        // other bitfields on every kernel since 5.x; the exact place
        // differs, which is why it is read from BTF.
        assert!(state.byte > 0 && state.shift <= 6, "{state:?}");
    }

    /// Every instruction of `words` as 8 bytes.
    fn insns(words: &[u64]) -> impl Iterator<Item = [u8; 8]> + '_ {
        words.iter().map(|w| w.to_le_bytes())
    }

    #[test]
    fn every_placeholder_becomes_the_kfunc_call_and_the_field_load() {
        let state = SkbChecksumState {
            cast_to_kern_ctx: 0x1234,
            byte: 0x80,
            shift: 5,
        };
        let patched = patch(super::super::EBPF_OBJECT, Some(&state)).unwrap();
        let calls = insns(&patched)
            .filter(|i| i[0] == CALL && i[1] == 0x20 && i[4..8] == 0x1234u32.to_le_bytes())
            .count();
        let loads: Vec<usize> = insns(&patched)
            .enumerate()
            .filter(|(_, i)| i[0] == LDX_B && i[2..4] == 0x80i16.to_le_bytes())
            .map(|(n, _)| n)
            .collect();
        // Both tc programs rewrite, each in more than one place.
        assert!(calls >= 2, "{calls} kfunc calls");
        assert_eq!(loads.len(), calls);
        for n in loads {
            let shift = patched[n + 1].to_le_bytes();
            assert_eq!((shift[0], shift[4]), (RSH_K, 5));
        }
        assert!(!insns(&patched).any(|i| is_call_placeholder(&i) || is_load_placeholder(&i)));
    }

    #[test]
    fn without_the_state_the_call_becomes_a_null_result() {
        let patched = patch(super::super::EBPF_OBJECT, None).unwrap();
        let original = patch_nothing(super::super::EBPF_OBJECT);
        let placeholders = insns(&original).filter(|i| is_call_placeholder(i)).count();
        assert!(placeholders >= 2);
        let zeroed = insns(&patched)
            .zip(insns(&original))
            .filter(|(p, o)| is_call_placeholder(o) && *p == [MOV_K, 0, 0, 0, 0, 0, 0, 0])
            .count();
        assert_eq!(zeroed, placeholders);
    }

    /// `object` copied to words as `patch` lays it out, unchanged.
    fn patch_nothing(object: &[u8]) -> Vec<u64> {
        let mut words = vec![0u64; object.len().div_ceil(INSN_LEN)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..object.len()].copy_from_slice(object);
        words
    }

    #[test]
    fn a_file_that_is_not_the_object_is_refused() {
        assert!(matches!(
            patch(&[0u8; 64], None),
            Err(KfuncError::Object(_))
        ));
    }
}
