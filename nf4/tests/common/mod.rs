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

pub use nf4::element::{from_le_bytes as from_bytes, to_le_bytes as bytes_of};

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
    from_bytes(bytes)
}
