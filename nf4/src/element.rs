//! The float types a 4-bit tensor comes from and dequantizes to.

use half::{bf16, f16};

/// The original (and output) dtype of a quantized tensor, as bitsandbytes names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    /// `float32`
    F32,
    /// `float16`
    F16,
    /// `bfloat16`
    Bf16,
}

impl FloatDtype {
    /// bitsandbytes' name in the serialized quant state (`str(torch.dtype).strip("torch.")`).
    pub fn bnb_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::Bf16 => "bfloat16",
        }
    }
    /// Parses bitsandbytes' name.
    pub fn from_bnb_name(s: &str) -> Option<Self> {
        match s {
            "float32" => Some(FloatDtype::F32),
            "float16" => Some(FloatDtype::F16),
            "bfloat16" => Some(FloatDtype::Bf16),
            _ => None,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            _ => 2,
        }
    }
    /// The safetensors dtype.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            FloatDtype::F32 => safetensors::Dtype::F32,
            FloatDtype::F16 => safetensors::Dtype::F16,
            FloatDtype::Bf16 => safetensors::Dtype::BF16,
        }
    }
    /// From a safetensors dtype, if it is one of ours.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(FloatDtype::F32),
            safetensors::Dtype::F16 => Some(FloatDtype::F16),
            safetensors::Dtype::BF16 => Some(FloatDtype::Bf16),
            _ => None,
        }
    }
}

/// f32 -> bf16 bits, round to nearest even; NaN becomes the canonical `0x7fff`, as CUDA's
/// `__float2bfloat16_rn` and `cvt.rn.bf16.f32` do. The GPU kernel uses the same rule.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return 0x7fff;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// Flushes a denormal to a zero of the same sign (what CUDA's `.ftz` does).
#[inline(always)]
pub fn flush_denormal(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `a * b` as CUDA's `mul.rn.ftz.f32`: denormal inputs and results flushed to zero.
/// bitsandbytes is compiled with `--use_fast_math`, so all its f32 multiplies are this.
#[inline(always)]
pub fn mul_ftz(a: f32, b: f32) -> f32 {
    flush_denormal(flush_denormal(a) * flush_denormal(b))
}

/// A float type we read from and write to. Sealed: f32, f16, bf16.
pub trait Element: Copy + Send + Sync + 'static + private::Sealed {
    /// Its dtype.
    const DTYPE: FloatDtype;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even narrowing from f32 (bit-identical to CUDA's `_rn` conversions
    /// for finite values).
    fn from_f32(x: f32) -> Self;
    /// The raw bits, zero-extended.
    fn to_bits_u32(self) -> u32;
    /// From raw bits (the low 16 for f16/bf16).
    fn from_bits_u32(bits: u32) -> Self;
}

/// Little-endian bytes of a slice of elements (what safetensors stores).
pub fn to_le_bytes<T: Element>(v: &[T]) -> Vec<u8> {
    let size = T::DTYPE.size();
    let mut out = Vec::with_capacity(v.len() * size);
    for x in v {
        out.extend_from_slice(&x.to_bits_u32().to_le_bytes()[..size]);
    }
    out
}

/// Elements of `T`'s own dtype from little-endian bytes (a trailing partial element is ignored).
pub fn from_le_bytes<T: Element>(bytes: &[u8]) -> Vec<T> {
    let size = T::DTYPE.size();
    bytes
        .chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..size].copy_from_slice(c);
            T::from_bits_u32(u32::from_le_bytes(b))
        })
        .collect()
}

impl Element for f32 {
    const DTYPE: FloatDtype = FloatDtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits()
    }
    fn from_bits_u32(bits: u32) -> Self {
        f32::from_bits(bits)
    }
}

impl Element for f16 {
    const DTYPE: FloatDtype = FloatDtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
    fn from_bits_u32(bits: u32) -> Self {
        f16::from_bits(bits as u16)
    }
}

impl Element for bf16 {
    const DTYPE: FloatDtype = FloatDtype::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_bits(f32_to_bf16_bits(x))
    }
    fn to_bits_u32(self) -> u32 {
        self.to_bits() as u32
    }
    fn from_bits_u32(bits: u32) -> Self {
        bf16::from_bits(bits as u16)
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half_crate_on_finite_values() {
        // half's from_f32 is RNE too; ours differs only in the NaN payload.
        let mut s = 0x1234_5678_9abc_def0u64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = f32::from_bits(s as u32);
            if x.is_nan() {
                assert_eq!(f32_to_bf16_bits(x), 0x7fff);
                continue;
            }
            assert_eq!(f32_to_bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x:e}");
        }
    }
}
