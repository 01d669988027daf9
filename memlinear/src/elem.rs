//! Element types: f32, f16 and bf16, with the one rounding rule everything uses.

use half::{bf16, f16};

/// The dtype codes of the C ABI and the generated kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit float.
    F32 = 0,
    /// IEEE half.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
    /// From the C ABI code.
    pub fn from_code(c: i32) -> Option<Dtype> {
        match c {
            0 => Some(Dtype::F32),
            1 => Some(Dtype::F16),
            2 => Some(Dtype::Bf16),
            _ => None,
        }
    }
    /// `x` rounded to this dtype (round to nearest even; `F32`: unchanged), as f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::F32 => x,
            Dtype::F16 => <f16 as Elem>::round(x),
            Dtype::Bf16 => <bf16 as Elem>::round(x),
        }
    }
    /// `x` rounded to this 16-bit dtype, as its raw bits (what GPU kernels that treat
    /// 16-bit values as `unsigned short` read and write).
    ///
    /// # Panics
    /// For `F32`, which has no 16-bit encoding.
    pub fn to_bits16(self, x: f32) -> u16 {
        match self {
            Dtype::F16 => f16::from_f32(x).to_bits(),
            Dtype::Bf16 => bf16::from_f32(x).to_bits(),
            Dtype::F32 => panic!("Dtype::to_bits16: f32 is not a 16-bit dtype"),
        }
    }
    /// The value of raw 16-bit bits of this dtype.
    ///
    /// # Panics
    /// For `F32`, which has no 16-bit encoding.
    pub fn from_bits16(self, b: u16) -> f32 {
        match self {
            Dtype::F16 => f16::from_bits(b).to_f32(),
            Dtype::Bf16 => bf16::from_bits(b).to_f32(),
            Dtype::F32 => panic!("Dtype::from_bits16: f32 is not a 16-bit dtype"),
        }
    }
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// An element type: conversion to f32 and round-to-nearest-even from f32.
pub trait Elem: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    /// The dtype.
    const DTYPE: Dtype;
    /// Exact widening.
    fn to_f32(self) -> f32;
    /// Round to nearest even.
    fn from_f32(x: f32) -> Self;
    /// `x` rounded to this type's precision, as f32.
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
}

impl Elem for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl Elem for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
impl Elem for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_encodings_round_to_nearest_even_and_round_trip() {
        for dt in [Dtype::F16, Dtype::Bf16] {
            for x in [0.0f32, -1.5, 3.1, 1e-3, 65504.0, f32::INFINITY] {
                let b = dt.to_bits16(x);
                assert_eq!(dt.from_bits16(b), dt.round(x), "{} {x}", dt.name());
                assert_eq!(dt.to_bits16(dt.from_bits16(b)), b);
            }
        }
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(Dtype::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(Dtype::F32.round(0.1), 0.1);
        assert!(std::panic::catch_unwind(|| Dtype::F32.to_bits16(1.0)).is_err());
    }
}
