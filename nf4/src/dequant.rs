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

fn check_packed(tensor: &str, packed: &[u8], state: &QuantState) -> Result<()> {
    if packed.len() < state.packed_len() {
        return Err(Nf4Error::field(
            tensor,
            "weight",
            format!(
                "packed data holds {} bytes but shape {:?} needs {}",
                packed.len(),
                state.shape,
                state.packed_len()
            ),
        ));
    }
    Ok(())
}

#[inline(always)]
fn nibble(packed: &[u8], i: usize) -> usize {
    let b = packed[i >> 1];
    (if i & 1 == 0 { b >> 4 } else { b & 0x0f }) as usize
}

/// The reference: one element at a time, no cleverness. Returns the output in
/// [`QuantState::output_shape`] order.
pub fn dequantize_reference<T: Element>(tensor: &str, packed: &[u8], state: &QuantState) -> Result<Vec<T>> {
    state.validate(tensor)?;
    check_packed(tensor, packed, state)?;
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
    state.validate(tensor)?;
    check_packed(tensor, packed, state)?;
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
    state.validate(tensor)?;
    check_packed(tensor, packed, state)?;
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

fn transpose<T: Copy>(flat: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = Vec::with_capacity(flat.len());
    for c in 0..cols {
        for r in 0..rows {
            t.push(flat[r * cols + c]);
        }
    }
    t
}
