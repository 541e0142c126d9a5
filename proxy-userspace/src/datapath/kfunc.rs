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
const AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const PSEUDO_KFUNC_CALL: u8 = 2;

#[derive(Debug, Error)]
pub enum KfuncError {
    #[error("reading the kernel's BTF ({VMLINUX_BTF}): {0}")]
    Btf(String),
    #[error("the kernel has no {CAST_TO_KERN_CTX} kfunc (Linux 6.2 or later has it)")]
    NoKfunc,
    #[error("struct sk_buff has no ip_summed field this datapath can read ({0})")]
    NoField(&'static str),
    #[error("the embedded eBPF object is not the ELF this kproxy was built with: {0}")]
    Object(String),
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
        let (bit, size) = find_member(btf, &sk_buff, "ip_summed", 0, 4)
            .ok_or(KfuncError::NoField("not found"))?;
        if size != Some(2) {
            return Err(KfuncError::NoField("not a 2-bit field"));
        }
        if cfg!(target_endian = "big") {
            // BTF bit offsets count from the most significant bit there.
            return Err(KfuncError::NoField("bitfields of a big-endian kernel"));
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
) -> Option<(u32, Option<u32>)> {
    for member in &ty.members {
        let bit = base + member.bit_offset();
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            return Some((bit, member.bitfield_size().filter(|s| *s != 0)));
        }
        if member_name.is_empty() && depth > 0 {
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(member) {
                if let Some(found) = find_member(btf, &inner, name, bit, depth - 1) {
                    return Some(found);
                }
            }
        }
    }
    None
}

/// The object, patched (see [`patch`]).
pub struct Patched {
    /// The ELF, 8-byte aligned as aya parses it (trailing padding beyond
    /// the object's length).
    pub words: Vec<u64>,
    /// Every placeholder became the kfunc call and the field load: the
    /// tc programs read the skb's checksum state.
    pub reads_state: bool,
}

/// `object` with its placeholders patched for `state`. Each placeholder is
/// the sequence `skb.rs` emits in one `asm!` block:
///
/// ```text
/// call PLACEHOLDER        -> call bpf_cast_to_kern_ctx   | r0 = 0
/// S = 4                      (4: no state read)
/// if r0 == 0 goto +3
/// S = *(u8 *)(r0 + OFF)   -> OFF = ip_summed's byte
/// S >>= 0                 -> its bit
/// S &= 3
/// ```
///
/// A call not followed by exactly that (a compiler that emitted it some
/// other way), or with `state` `None`, becomes `r0 = 0`: the load after it
/// is then dead code, which the verifier skips, and that rewrite takes the
/// checksum helper. Never a reason not to load.
pub fn patch(object: &[u8], state: Option<&SkbChecksumState>) -> Result<Patched, KfuncError> {
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
    let (mut read, mut not_read) = (0, 0);
    for (start, len) in text {
        let section = bytes
            .get_mut(start..start + len)
            .ok_or_else(|| KfuncError::Object("a section past the end".into()))?;
        let mut insns: Vec<&mut [u8]> = section.chunks_exact_mut(INSN_LEN).collect();
        for i in 0..insns.len() {
            if !is_call_placeholder(insns[i]) {
                continue;
            }
            match (state, placeholder_register(&insns[i + 1..])) {
                (Some(s), Some(_)) => {
                    // call kfunc: src_reg BPF_PSEUDO_KFUNC_CALL, imm the BTF
                    // id, off 0 (vmlinux's BTF).
                    insns[i][1] = PSEUDO_KFUNC_CALL << 4;
                    insns[i][4..8].copy_from_slice(&s.cast_to_kern_ctx.to_le_bytes());
                    insns[i + 3][2..4].copy_from_slice(&s.byte.to_le_bytes());
                    insns[i + 4][4..8].copy_from_slice(&i32::from(s.shift).to_le_bytes());
                    read += 1;
                }
                _ => {
                    // r0 = 0
                    insns[i].copy_from_slice(&[MOV_K, 0, 0, 0, 0, 0, 0, 0]);
                    not_read += 1;
                }
            }
        }
    }
    Ok(Patched {
        words,
        reads_state: read > 0 && not_read == 0,
    })
}

/// The register `S` of the placeholder sequence (see [`patch`]) when
/// `after`, the instructions after a placeholder call, hold it exactly.
fn placeholder_register(after: &[&mut [u8]]) -> Option<u8> {
    let [mov, jeq, load, shift, and, ..] = after else {
        return None;
    };
    let s = mov[1] & 0x0f;
    let regs = |insn: &[u8], dst: u8, src: u8| insn[1] == (src << 4 | dst);
    let imm = |insn: &[u8]| i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
    let off = |insn: &[u8]| i16::from_le_bytes([insn[2], insn[3]]);
    let ok = s != 0
        && mov[0] == MOV_K
        && regs(mov, s, 0)
        && imm(mov) == 4
        && jeq[0] == JEQ_K
        && regs(jeq, 0, 0)
        && off(jeq) == 3
        && imm(jeq) == 0
        && is_load_placeholder(load)
        && regs(load, s, 0)
        && shift[0] == RSH_K
        && regs(shift, s, 0)
        && imm(shift) == 0
        && and[0] == AND_K
        && regs(and, s, 0)
        && imm(and) == 3;
    ok.then_some(s)
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

    use crate::datapath::EBPF_OBJECT;

    #[test]
    fn the_running_kernel_says_where_ip_summed_is() {
        // Linux 6.2 and later, with BTF: what CI and the lab run on.
        let state = SkbChecksumState::probe().expect("this kernel has BTF and the kfunc");
        assert!(state.cast_to_kern_ctx > 0);
        // `ip_summed` sits in a byte of bitfields well inside the struct
        // on every kernel since 5.x; the exact place differs, which is why
        // it is read from BTF.
        assert!(state.byte > 0 && state.shift <= 6, "{state:?}");
    }

    const STATE: SkbChecksumState = SkbChecksumState {
        cast_to_kern_ctx: 0x1234,
        byte: 0x80,
        shift: 5,
    };

    /// Every 8-byte word of `words`, an instruction where it is text.
    fn insns(words: &[u64]) -> Vec<[u8; 8]> {
        words.iter().map(|w| w.to_le_bytes()).collect()
    }

    /// Indexes of the placeholder calls in `object`.
    fn placeholders(object: &[u8]) -> Vec<usize> {
        let words = patch_nothing(object);
        insns(&words)
            .iter()
            .enumerate()
            .filter(|(_, i)| is_call_placeholder(&i[..]))
            .map(|(n, _)| n)
            .collect()
    }

    /// `object` copied to words as `patch` lays it out, unchanged.
    fn patch_nothing(object: &[u8]) -> Vec<u64> {
        let mut words = vec![0u64; object.len().div_ceil(INSN_LEN)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..object.len()].copy_from_slice(object);
        words
    }

    #[test]
    fn every_placeholder_becomes_the_kfunc_call_and_the_field_load() {
        let sites = placeholders(EBPF_OBJECT);
        // Both tc programs rewrite, each in more than one place.
        assert!(sites.len() >= 2, "{} placeholders", sites.len());
        let patched = patch(EBPF_OBJECT, Some(&STATE)).unwrap();
        assert!(patched.reads_state);
        let insns = insns(&patched.words);
        for n in sites {
            assert_eq!(insns[n][..2], [CALL, 0x20], "kfunc call at {n}");
            assert_eq!(insns[n][4..], 0x1234u32.to_le_bytes());
            assert_eq!(insns[n + 3][0], LDX_B);
            assert_eq!(
                insns[n + 3][2..4],
                0x80i16.to_le_bytes(),
                "ip_summed's byte"
            );
            assert_eq!((insns[n + 4][0], insns[n + 4][4]), (RSH_K, 5), "its bit");
        }
        assert!(!insns
            .iter()
            .any(|i| is_call_placeholder(&i[..]) || is_load_placeholder(&i[..])));
    }

    #[test]
    fn without_the_state_every_call_becomes_a_null_result() {
        let sites = placeholders(EBPF_OBJECT);
        let patched = patch(EBPF_OBJECT, None).unwrap();
        assert!(!patched.reads_state);
        let insns = insns(&patched.words);
        for n in sites {
            assert_eq!(insns[n], [MOV_K, 0, 0, 0, 0, 0, 0, 0], "r0 = 0 at {n}");
        }
    }

    #[test]
    fn a_placeholder_emitted_otherwise_falls_back_to_the_helper() {
        let sites = placeholders(EBPF_OBJECT);
        let mut object = EBPF_OBJECT.to_vec();
        // The first placeholder's `S &= 3` becomes `S &= 7`.
        object[(sites[0] + 5) * INSN_LEN + 4] = 7;
        let patched = patch(&object, Some(&STATE)).unwrap();
        assert!(!patched.reads_state, "not every rewrite reads the state");
        let insns = insns(&patched.words);
        assert_eq!(insns[sites[0]], [MOV_K, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            insns[sites[1]][..2],
            [CALL, 0x20],
            "the others still read it"
        );
    }

    #[test]
    fn a_file_that_is_not_the_object_is_refused() {
        assert!(matches!(
            patch(&[0u8; 64], None),
            Err(KfuncError::Object(_))
        ));
    }
}
