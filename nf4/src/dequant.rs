//! CPU dequantization: a plain reference and a fast multi-threaded path.
//!
//! Both compute, per element, `code[nibble] * absmax[block]` in f32 (denormals flushed, as
//! bitsandbytes' fast-math build does) and round it once to the output type (round to
//! nearest even), which is what bitsandbytes' CUDA kernel does.
//! The fast path precomputes the 16 rounded products of each block and then only looks
//! them up: the same values, so its output is identical to the reference's (a test holds
//! it to that).

use rayon::prelude::*;

use crate::element::{mul_ftz, Element};
use crate::error::{Nf4Error, Result};
use crate::state::QuantState;

#[inline(always)]
fn nibble(packed: &[u8], i: usize) -> usize {
    let b = packed[i >> 1];
    (if i & 1 == 0 { b >> 4 } else { b & 0x0f }) as usize
}

/// The reference: one element at a time, no cleverness. Returns the output in
/// [`QuantState::output_shape`] order.
pub fn dequantize_reference<T: Element>(tensor: &str, packed: &[u8], state: &QuantState) -> Result<Vec<T>> {
    state.validate_with_packed(tensor, packed.len())?;
    let absmax = state.absmax.to_f32();
    let code = state.dequant_code();
    let n = state.numel();
    let mut flat = Vec::with_capacity(n);
    for i in 0..n {
        let v = mul_ftz(code[nibble(packed, i)], absmax[i / state.blocksize]);
        flat.push(T::from_f32(v));
    }
    Ok(if state.is_transposed() { transpose(&flat, state.shape[0], state.shape[1]) } else { flat })
}

/// The fast path, into a caller's buffer of exactly `numel` elements.
pub fn dequantize_into<T: Element>(tensor: &str, packed: &[u8], state: &QuantState, out: &mut [T]) -> Result<()> {
    state.validate_with_packed(tensor, packed.len())?;
    if out.len() != state.numel() {
        return Err(Nf4Error::field(
            tensor,
            "out",
            format!("the output buffer holds {} elements but the tensor has {}", out.len(), state.numel()),
        ));
    }
    if state.is_transposed() {
        let flat: Vec<T> = dequantize_flat(packed, state);
        out.copy_from_slice(&transpose(&flat, state.shape[0], state.shape[1]));
        return Ok(());
    }
    dequantize_flat_into(packed, state, out);
    Ok(())
}

/// The fast path, allocating the output.
pub fn dequantize<T: Element>(tensor: &str, packed: &[u8], state: &QuantState) -> Result<Vec<T>> {
    state.validate_with_packed(tensor, packed.len())?;
    let mut out = vec![T::from_f32(0.0); state.numel()];
    dequantize_into(tensor, packed, state, &mut out)?;
    Ok(out)
}

fn dequantize_flat<T: Element>(packed: &[u8], state: &QuantState) -> Vec<T> {
    let mut out = vec![T::from_f32(0.0); state.numel()];
    dequantize_flat_into(packed, state, &mut out);
    out
}

fn dequantize_flat_into<T: Element>(packed: &[u8], state: &QuantState, out: &mut [T]) {
    let absmax = state.absmax.to_f32();
    let bs = state.blocksize;
    let code = state.dequant_code();
    // Blocks are even-sized, so each owns whole bytes; group several per task so that small
    // blocks do not drown in scheduling.
    let per_task = (1 << 16) / bs;
    out.par_chunks_mut(bs * per_task).enumerate().for_each(|(t, chunk)| {
        for (k, block) in chunk.chunks_mut(bs).enumerate() {
            let b = t * per_task + k;
            let am = absmax[b];
            let table: [T; 16] = std::array::from_fn(|c| T::from_f32(mul_ftz(code[c], am)));
            let bytes = &packed[b * bs / 2..];
            // 16-bit outputs: 32 table lookups per SSSE3 shuffle pair (see `simd`).
            let done = simd::decode16(&table, bytes, block);
            let (block, bytes) = (&mut block[done..], &bytes[done / 2..]);
            if block.is_empty() {
                continue;
            }
            let last_byte = (block.len() - 1) / 2;
            let mut pairs = block.chunks_exact_mut(2);
            for (pair, &byte) in (&mut pairs).zip(bytes) {
                pair[0] = table[(byte >> 4) as usize];
                pair[1] = table[(byte & 0x0f) as usize];
            }
            if let [last] = pairs.into_remainder() {
                *last = table[(bytes[last_byte] >> 4) as usize];
            }
        }
    });
}

/// Table-lookup decoding with byte shuffles: a block's 16 rounded outputs are two 16-byte
/// tables (low and high bytes), and `pshufb` looks 16 nibbles up in each at once. Same
/// values as the scalar loop (it only moves precomputed table entries).
mod simd {
    use crate::element::{Element, FloatDtype};

    /// Decodes as many leading elements of `out` as whole 16-byte groups of `bytes` allow
    /// (32 elements each); returns how many it wrote (0 for f32 or without SSSE3).
    pub fn decode16<T: Element>(table: &[T; 16], bytes: &[u8], out: &mut [T]) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            if T::DTYPE != FloatDtype::F32 && std::arch::is_x86_feature_detected!("ssse3") {
                let groups = (out.len() / 32).min(bytes.len() / 16);
                let bits: [u16; 16] = std::array::from_fn(|i| table[i].to_bits_u32() as u16);
                // SAFETY: T is f16 or bf16 here (DTYPE is not F32), both `repr(transparent)`
                // over u16, so the slice reinterpretation keeps size and alignment; SSSE3 was
                // detected at run time.
                unsafe {
                    let out16 = std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u16, groups * 32);
                    x86::decode(&bits, &bytes[..groups * 16], out16);
                }
                return groups * 32;
            }
        }
        let _ = (table, bytes, out);
        0
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// `out.len() == 2 * bytes.len()`, `bytes.len()` a multiple of 16.
        #[target_feature(enable = "ssse3")]
        pub unsafe fn decode(table: &[u16; 16], bytes: &[u8], out: &mut [u16]) {
            let lo: [u8; 16] = std::array::from_fn(|i| table[i] as u8);
            let hi: [u8; 16] = std::array::from_fn(|i| (table[i] >> 8) as u8);
            let lo_t = _mm_loadu_si128(lo.as_ptr() as *const __m128i);
            let hi_t = _mm_loadu_si128(hi.as_ptr() as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            for (src, dst) in bytes.chunks_exact(16).zip(out.chunks_exact_mut(32)) {
                let b = _mm_loadu_si128(src.as_ptr() as *const __m128i);
                let first = _mm_and_si128(_mm_srli_epi16(b, 4), mask); // element 2j: high nibble
                let second = _mm_and_si128(b, mask); // element 2j + 1: low nibble
                let idx_a = _mm_unpacklo_epi8(first, second); // elements 0..16
                let idx_b = _mm_unpackhi_epi8(first, second); // elements 16..32
                let (la, ha) = (_mm_shuffle_epi8(lo_t, idx_a), _mm_shuffle_epi8(hi_t, idx_a));
                let (lb, hb) = (_mm_shuffle_epi8(lo_t, idx_b), _mm_shuffle_epi8(hi_t, idx_b));
                let p = dst.as_mut_ptr() as *mut __m128i;
                _mm_storeu_si128(p, _mm_unpacklo_epi8(la, ha));
                _mm_storeu_si128(p.add(1), _mm_unpackhi_epi8(la, ha));
                _mm_storeu_si128(p.add(2), _mm_unpacklo_epi8(lb, hb));
                _mm_storeu_si128(p.add(3), _mm_unpackhi_epi8(lb, hb));
            }
        }
    }
}

fn transpose<T: Copy>(flat: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = Vec::with_capacity(flat.len());
    for c in 0..cols {
        for r in 0..rows {
            t.push(flat[r * cols + c]);
        }
    }
    t
}
