//! CPU quantization, bit-identical to `bitsandbytes.functional.quantize_4bit` on CUDA.
//!
//! Per block of `blocksize` elements (over the flattened tensor): `absmax = max |x|`,
//! `inv = 1 / absmax`, each element's code is the decision tree applied to `x * inv`.
//! bitsandbytes is compiled with `--use_fast_math`, so its `1 / absmax` is the GPU's
//! approximate reciprocal ([`crate::rcp`]) and its multiplies flush denormals; we do the
//! same. A block of zeros has `inv = inf`, so `0 * inf = NaN`, which both trees send to
//! code 0: we reproduce that rather than special-casing it.
//!
//! Double quantization: `offset = mean(absmax)`, then `absmax - offset` is quantized with
//! the signed dynamic 8-bit map in blocks of 256 (same absmax/inverse scheme, code chosen
//! by bitsandbytes' binary search). The mean is PyTorch's (see [`mean_f32`]); its f32 tree
//! summation order is not reproduced, so on large tensors the offset can differ by an ulp,
//! and then a few nested codes near a rounding boundary with it. Given their offset,
//! every other byte is identical ([`quantize_nested_absmax`] takes the offset as an
//! argument for exactly that check).

use rayon::prelude::*;

use crate::codes::{dynamic_map, quantize_8bit, QuantType};
use crate::element::{flush_denormal, mul_ftz, Element};
use crate::rcp::rcp_approx_ftz;
use crate::error::{Nf4Error, Result};
use crate::state::{Absmax, PackedStorage, QuantState, BLOCKSIZES, NESTED_BLOCKSIZE};

/// How to quantize.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// nf4 (default) or fp4.
    pub quant_type: QuantType,
    /// Elements per block, a power of two in 32..=4096 (default 64).
    pub blocksize: usize,
    /// Double-quantize the absmax (bitsandbytes' `compress_statistics`, default true).
    pub nested: bool,
    /// The dtype the packed bytes are stored as in a checkpoint (`quant_storage`, default U8).
    pub storage: safetensors::Dtype,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, nested: true, storage: safetensors::Dtype::U8 }
    }
}

/// A quantized tensor: packed codes plus the state to decode them.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    /// Two codes per byte, high nibble first; `state.packed_len()` bytes (plus zero padding
    /// up to the storage dtype's size).
    pub packed: Vec<u8>,
    /// How to decode them.
    pub state: QuantState,
}

/// Quantizes `data` (row-major, of `shape`) to 4 bits. `tensor` names it in errors.
pub fn quantize<T: Element>(tensor: &str, data: &[T], shape: &[usize], opts: &QuantizeOptions) -> Result<Quantized> {
    let n: usize = shape.iter().product();
    if data.len() != n {
        return Err(Nf4Error::field(
            tensor,
            "shape",
            format!("{shape:?} has {n} elements but the data holds {}", data.len()),
        ));
    }
    if !BLOCKSIZES.contains(&opts.blocksize) {
        return Err(Nf4Error::field(
            tensor,
            "blocksize",
            format!("{} is not supported (expected one of {:?})", opts.blocksize, BLOCKSIZES),
        ));
    }
    if let Some(i) = data.par_iter().position_first(|x| !x.to_f32().is_finite()) {
        return Err(Nf4Error::NonFinite { tensor: tensor.to_string(), index: i, value: data[i].to_f32() });
    }
    let bs = opts.blocksize;
    let qt = opts.quant_type;
    let nb = n.div_ceil(bs);
    let itemsize = opts.storage.bitsize() / 8;
    if itemsize == 0 {
        return Err(Nf4Error::field(tensor, "quant_storage", format!("{:?} is narrower than a byte", opts.storage)));
    }
    let packed_len = n.div_ceil(2);
    let storage_len = packed_len.div_ceil(itemsize) * itemsize;
    let mut packed = vec![0u8; storage_len];
    let mut absmax = vec![0f32; nb];

    // blocksize is even, so each block owns whole bytes: blocks are independent.
    packed[..packed_len]
        .par_chunks_mut(bs / 2)
        .zip(data.par_chunks(bs))
        .zip(absmax.par_iter_mut())
        .for_each(|((out, block), am)| {
            let m = block.iter().fold(-f32::MAX, |m, x| m.max(flush_denormal(x.to_f32().abs())));
            *am = m;
            let inv = rcp_approx_ftz(m);
            for (j, byte) in out.iter_mut().enumerate() {
                let hi = qt.quantize(mul_ftz(block[2 * j].to_f32(), inv));
                // An odd tensor's last low nibble encodes a padding zero, as bitsandbytes' does.
                let lo_x = block.get(2 * j + 1).map_or(0.0, |x| x.to_f32());
                let lo = qt.quantize(mul_ftz(lo_x, inv));
                *byte = (hi << 4) | lo;
            }
        });

    let absmax = if opts.nested {
        let offset = mean_f32(&absmax);
        let (q, absmax2) = quantize_nested_absmax(&absmax, offset);
        QuantState::nested_default(q, absmax2, offset)
    } else {
        Absmax::Plain(absmax)
    };
    let state = QuantState {
        quant_type: qt,
        blocksize: bs,
        dtype: T::DTYPE,
        shape: shape.to_vec(),
        code: *qt.code(),
        absmax,
        storage: if itemsize == 1 {
            PackedStorage::default_for(n)
        } else {
            PackedStorage { dtype: opts.storage, shape: vec![storage_len / itemsize, 1] }
        },
    };
    Ok(Quantized { packed, state })
}

/// The nested `offset` as PyTorch's CUDA `mean` computes it: an f32 sum, then multiplied
/// by `1/n` rounded to f32 (its `MeanOps` scales by a factor; it does not divide). We take
/// the correctly rounded sum for PyTorch's f32 tree sum: exact on every fixture, and at
/// most an ulp away in general.
pub fn mean_f32(xs: &[f32]) -> f32 {
    if xs.is_empty() {
        return 0.0; // an empty tensor: no block to decode, but a finite, serializable offset
    }
    let s: f64 = xs.iter().map(|&x| x as f64).sum();
    (s as f32) * (1.0f32 / xs.len() as f32)
}

/// Quantizes `absmax - offset` with the signed dynamic map in blocks of 256, exactly as
/// bitsandbytes' `quantize_blockwise` does. Returns (codes, absmax2).
pub fn quantize_nested_absmax(absmax: &[f32], offset: f32) -> (Vec<u8>, Vec<f32>) {
    let code = dynamic_map();
    let mut q = vec![0u8; absmax.len()];
    let mut absmax2 = vec![0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    q.par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(absmax.par_chunks(NESTED_BLOCKSIZE))
        .zip(absmax2.par_iter_mut())
        .for_each(|((out, block), am2)| {
            // `absmax - offset` is a PyTorch op (no flush); the rest is bitsandbytes' kernel.
            let centred: Vec<f32> = block.iter().map(|&a| a - offset).collect();
            let m = centred.iter().fold(-f32::MAX, |m, x| m.max(flush_denormal(x.abs())));
            *am2 = m;
            let inv = rcp_approx_ftz(m);
            for (o, &x) in out.iter_mut().zip(&centred) {
                *o = quantize_8bit(&code, mul_ftz(x, inv));
            }
        });
    (q, absmax2)
}
