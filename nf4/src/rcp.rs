//! The H100's approximate reciprocal, `rcp.approx.ftz.f32` (MUFU.RCP), exactly.
//!
//! bitsandbytes is built with `--use_fast_math`, so the `1.0f / absmax` of its quantizer
//! is this instruction, not a correctly rounded division. It is off by one ulp for about
//! 13% of inputs, and that is enough to flip an element whose normalised value sits on a
//! code threshold (common with bf16 inputs and FP4's rational thresholds). To quantize
//! bit-identically on the CPU we reproduce it: for a normal input it depends only on the
//! mantissa (the exponent shifts the result; checked on 4M random inputs), so a table of
//! the one-ulp corrections for the 2^23 mantissas, measured on an H100 by
//! `nf4/py/rcp_probe.py` and stored as 2 bits per mantissa (zlib, 151 KB), defines it.
//! Other GPU generations may round differently: we match bitsandbytes run on sm_90.

use std::sync::OnceLock;

use crate::element::flush_denormal;

static PACKED_Z: &[u8] = include_bytes!("rcp_sm90.bin.z");

fn table() -> &'static [u8] {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let t = miniz_oxide::inflate::decompress_to_vec_zlib(PACKED_Z).expect("embedded rcp table is valid zlib");
        assert_eq!(t.len(), 1 << 21, "embedded rcp table has 2 bits for each of 2^23 mantissas");
        t
    })
}

/// `rcp.approx.ftz.f32` as the H100 computes it.
pub fn rcp_approx_ftz(x: f32) -> f32 {
    let x = flush_denormal(x);
    if x == 0.0 {
        return f32::INFINITY.copysign(x);
    }
    if x.is_nan() || x.is_infinite() {
        return 1.0 / x; // NaN, or a zero of x's sign
    }
    let r = 1.0f32 / x;
    if r.abs() < f32::MIN_POSITIVE {
        return f32::from_bits(r.to_bits() & 0x8000_0000); // a denormal result is flushed
    }
    let m = (x.to_bits() & 0x007f_ffff) as usize;
    let code = (table()[m >> 2] >> ((m & 3) * 2)) & 3;
    match code {
        1 => f32::from_bits(r.to_bits() + 1),
        2 => f32::from_bits(r.to_bits() - 1),
        _ => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_division_within_one_ulp_and_on_exact_cases() {
        assert_eq!(rcp_approx_ftz(1.0), 1.0);
        assert_eq!(rcp_approx_ftz(2.0), 0.5);
        assert_eq!(rcp_approx_ftz(0.0), f32::INFINITY);
        assert_eq!(rcp_approx_ftz(-0.0), f32::NEG_INFINITY);
        assert_eq!(rcp_approx_ftz(1e-40), f32::INFINITY, "denormal input is flushed");
        let mut differ = 0;
        for i in 0..100_000u32 {
            let x = f32::from_bits(0x3f80_0000 + i * 83);
            let (a, b) = (rcp_approx_ftz(x), 1.0 / x);
            assert!((a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1, "{x}");
            assert_eq!(rcp_approx_ftz(-x), -a, "sign symmetry");
            assert_eq!(rcp_approx_ftz(x * 1024.0), a / 1024.0, "exponent shift");
            differ += (a != b) as u32;
        }
        // About 13% of mantissas differ (1108522 of 2^23 on the H100).
        assert!((9_000..17_000).contains(&differ), "{differ}");
    }
}
