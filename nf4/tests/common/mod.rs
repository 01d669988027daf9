#![allow(dead_code)]
use half::{bf16, f16};
use nf4::{Element, FloatDtype, QuantState};

/// A committed fixture. `NF4_FIXTURES` overrides the folder (test executables carried to
/// another machine keep the build machine's path otherwise).
pub fn fixture(name: &str) -> std::path::PathBuf {
    match std::env::var_os("NF4_FIXTURES") {
        Some(dir) => std::path::PathBuf::from(dir).join(name),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name),
    }
}

/// Raw little-endian bytes of a slice of elements.
pub fn bytes_of<T: Element>(v: &[T]) -> Vec<u8> {
    let size = T::DTYPE.size();
    v.iter().flat_map(|x| x.to_bits_u32().to_le_bytes()[..size].to_vec()).collect()
}

/// Dequantizes with the fast path into the state's own dtype; returns raw bytes.
pub fn dequant_bytes(name: &str, packed: &[u8], st: &QuantState, reference: bool) -> Vec<u8> {
    fn go<T: Element>(name: &str, packed: &[u8], st: &QuantState, reference: bool) -> Vec<u8> {
        let v: Vec<T> = if reference {
            nf4::dequantize_reference(name, packed, st).unwrap()
        } else {
            nf4::dequantize(name, packed, st).unwrap()
        };
        bytes_of(&v)
    }
    match st.dtype {
        FloatDtype::F32 => go::<f32>(name, packed, st, reference),
        FloatDtype::F16 => go::<f16>(name, packed, st, reference),
        FloatDtype::Bf16 => go::<bf16>(name, packed, st, reference),
    }
}

/// Index of the first differing element (of `size` bytes), for messages.
pub fn first_diff(a: &[u8], b: &[u8], size: usize) -> Option<usize> {
    a.chunks(size).zip(b.chunks(size)).position(|(x, y)| x != y)
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

pub fn from_bytes<T: Element>(bytes: &[u8]) -> Vec<T> {
    match T::DTYPE {
        FloatDtype::F32 => f32s(bytes).into_iter().map(T::from_f32).collect(),
        FloatDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| T::from_f32(f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            .collect(),
        FloatDtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| T::from_f32(bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            .collect(),
    }
}
