//! Property tests on fresh random data (seed printed; `NF4_TEST_SEED=<seed>` replays it):
//! every block size, nf4 and fp4, nested and plain, f32/f16/bf16 inputs, awkward sizes.
//!
//! - checkpoints round-trip exactly;
//! - the fast dequantizer equals the reference bit for bit;
//! - dequantized values are within half a code gap of the input (times the block's absmax,
//!   plus the nested absmax's own 8-bit error and the output's rounding): loose enough for
//!   every legal rounding, tight enough that swapped nibbles or a wrong block fail it (a
//!   test below checks that it does);
//! - the nibble order, the padding nibble of odd sizes, zero blocks, non-u8 storage and the
//!   quant-state JSON are exactly what bitsandbytes writes.

mod common;

use std::path::PathBuf;

use common::*;
use half::{bf16, f16};
use nf4::checkpoint::{quant_state_json, save, to_tensors, OwnedTensor};
use nf4::state::{BLOCKSIZES, NESTED_BLOCKSIZE};
use nf4::testing::Rng;
use nf4::{Absmax, Checkpoint, Element, FloatDtype, QuantState, QuantType, QuantizeOptions, Quantized};
use serde_json::Value;

/// Odd and tiny sizes (where the padding nibble and partial blocks live), a 2-D shape, a
/// scalar, and one with enough 32-blocks to need two nested-absmax groups.
const SHAPES: &[&[usize]] = &[&[], &[1], &[2], &[3], &[63], &[65], &[1001], &[17, 129], &[9001]];
const QUANT_TYPES: [QuantType; 2] = [QuantType::Nf4, QuantType::Fp4];
const DTYPES: [FloatDtype; 3] = [FloatDtype::F32, FloatDtype::F16, FloatDtype::Bf16];

#[derive(Clone, Copy, Debug)]
struct Combo {
    quant_type: QuantType,
    blocksize: usize,
    nested: bool,
    dtype: FloatDtype,
}

impl Combo {
    fn opts(self) -> QuantizeOptions {
        QuantizeOptions { quant_type: self.quant_type, blocksize: self.blocksize, nested: self.nested, ..QuantizeOptions::default() }
    }
    fn tag(self) -> String {
        format!("{}_bs{}_{}_{:?}", self.quant_type.name(), self.blocksize, if self.nested { "nested" } else { "plain" }, self.dtype)
    }
}

fn combos() -> Vec<Combo> {
    let mut v = Vec::new();
    for &blocksize in &BLOCKSIZES {
        for quant_type in QUANT_TYPES {
            for nested in [false, true] {
                for dtype in DTYPES {
                    v.push(Combo { quant_type, blocksize, nested, dtype });
                }
            }
        }
    }
    v
}

/// Input data in one of the three float types.
enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Data {
    /// Normal data at a random scale in [0.01, 100] (f16 keeps its range).
    fn random(rng: &mut Rng, dtype: FloatDtype, n: usize) -> Data {
        let scale = 10f64.powf(rng.uniform() * 4.0 - 2.0);
        match dtype {
            FloatDtype::F32 => Data::F32(rng.normal_vec(n, scale)),
            FloatDtype::F16 => Data::F16(rng.normal_vec(n, scale)),
            FloatDtype::Bf16 => Data::Bf16(rng.normal_vec(n, scale)),
        }
    }
    fn from_f32(dtype: FloatDtype, v: &[f32]) -> Data {
        match dtype {
            FloatDtype::F32 => Data::F32(v.to_vec()),
            FloatDtype::F16 => Data::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            FloatDtype::Bf16 => Data::Bf16(v.iter().map(|&x| <bf16 as Element>::from_f32(x)).collect()),
        }
    }
    /// The values exactly (widening is exact).
    fn values(&self) -> Vec<f32> {
        match self {
            Data::F32(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
    fn quantize(&self, name: &str, shape: &[usize], opts: &QuantizeOptions) -> Quantized {
        match self {
            Data::F32(v) => nf4::quantize(name, v, shape, opts),
            Data::F16(v) => nf4::quantize(name, v, shape, opts),
            Data::Bf16(v) => nf4::quantize(name, v, shape, opts),
        }
        .unwrap_or_else(|e| panic!("{name}: quantize failed: {e}"))
    }
}

/// Dequantizes into `out` type with the fast path and returns the values as f32 (exact).
fn dequant_values(name: &str, q: &Quantized, out: FloatDtype) -> Vec<f32> {
    fn go<T: Element>(name: &str, q: &Quantized) -> Vec<f32> {
        let v: Vec<T> = nf4::dequantize(name, &q.packed, &q.state).unwrap_or_else(|e| panic!("{name}: dequantize: {e}"));
        v.into_iter().map(Element::to_f32).collect()
    }
    match out {
        FloatDtype::F32 => go::<f32>(name, q),
        FloatDtype::F16 => go::<f16>(name, q),
        FloatDtype::Bf16 => go::<bf16>(name, q),
    }
}

struct TmpDir(PathBuf);

impl TmpDir {
    fn new(test: &str) -> TmpDir {
        let dir = std::env::temp_dir().join(format!("nf4-roundtrip-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TmpDir(dir)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Saves `q` (and `more`) and reads every weight back; asserts they come back equal and are
/// all listed. Returns the file's path for further checks.
fn checkpoint_round_trip(dir: &TmpDir, file: &str, weights: &[(String, Quantized)]) -> PathBuf {
    let path = dir.0.join(format!("{file}.safetensors"));
    let tensors: Vec<OwnedTensor> = weights.iter().flat_map(|(name, q)| to_tensors(name, q).unwrap_or_else(|e| panic!("to_tensors({name}): {e}"))).collect();
    save(&path, &tensors, None).unwrap_or_else(|e| panic!("{file}: save: {e}"));
    let ck = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{file}: open: {e}"));
    let mut names: Vec<String> = weights.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(ck.quantized_weights().unwrap_or_else(|e| panic!("{file}: {e}")), names, "{file}: quantized_weights");
    for (name, q) in weights {
        let back = ck.read(name).unwrap_or_else(|e| panic!("{file}: reading back {name}: {e}"));
        // Not assert_eq!: the Debug of thousands of bytes would drown the difference.
        assert!(back == *q, "{file} {name}: read back differs: {}", describe_diff(&back, q));
    }
    path
}

fn describe_diff(a: &Quantized, b: &Quantized) -> String {
    let (s, t) = (&a.state, &b.state);
    let mut d = Vec::new();
    if a.packed != b.packed {
        d.push(format!("packed ({} vs {} bytes, first diff {:?})", a.packed.len(), b.packed.len(), first_diff(&a.packed, &b.packed, 1)));
    }
    if s.quant_type != t.quant_type {
        d.push(format!("quant_type {:?} vs {:?}", s.quant_type, t.quant_type));
    }
    if s.blocksize != t.blocksize {
        d.push(format!("blocksize {} vs {}", s.blocksize, t.blocksize));
    }
    if s.dtype != t.dtype {
        d.push(format!("dtype {:?} vs {:?}", s.dtype, t.dtype));
    }
    if s.shape != t.shape {
        d.push(format!("shape {:?} vs {:?}", s.shape, t.shape));
    }
    if s.code != t.code {
        d.push(format!("code {:?} vs {:?}", s.code, t.code));
    }
    if s.storage != t.storage {
        d.push(format!("storage {:?} vs {:?}", s.storage, t.storage));
    }
    match (&s.absmax, &t.absmax) {
        (Absmax::Nested { offset: o1, blocksize2: b1, q: q1, absmax2: a1, .. }, Absmax::Nested { offset: o2, blocksize2: b2, q: q2, absmax2: a2, .. }) => {
            if o1.to_bits() != o2.to_bits() {
                d.push(format!("nested_offset {o1:e} vs {o2:e}"));
            }
            if b1 != b2 || q1 != q2 || a1 != a2 {
                d.push("nested absmax parts".into());
            }
        }
        (x, y) if x != y => d.push("absmax".into()),
        _ => {}
    }
    d.join("; ")
}

// ---------------------------------------------------------------------------------------
// (a) checkpoints

#[test]
fn checkpoint_round_trip_is_exact_for_every_combination() {
    let mut rng = Rng::fresh("roundtrip::checkpoint_round_trip");
    let dir = TmpDir::new("checkpoint");
    for c in combos() {
        // All shapes of a combination in one file, so reading also has to pick the right one.
        let weights: Vec<(String, Quantized)> = SHAPES
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let name = format!("model.layers.{i}.self_attn.q_proj.weight");
                let data = Data::random(&mut rng, c.dtype, shape.iter().product());
                let q = data.quantize(&name, shape, &c.opts());
                assert_eq!(q.state.absmax.is_nested(), c.nested);
                (name, q)
            })
            .collect();
        checkpoint_round_trip(&dir, &c.tag(), &weights);
    }
}

// ---------------------------------------------------------------------------------------
// (b) fast == reference

fn assert_fast_equals_reference<T: Element>(name: &str, q: &Quantized) {
    let fast: Vec<T> = nf4::dequantize(name, &q.packed, &q.state).unwrap_or_else(|e| panic!("{name}: fast: {e}"));
    let reference: Vec<T> =
        nf4::dequantize_reference(name, &q.packed, &q.state).unwrap_or_else(|e| panic!("{name}: reference: {e}"));
    let mut into = vec![<T as Element>::from_f32(1.0); q.state.numel()];
    nf4::dequantize_into(name, &q.packed, &q.state, &mut into).unwrap_or_else(|e| panic!("{name}: into: {e}"));
    let (f, r, i) = (bytes_of(&fast), bytes_of(&reference), bytes_of(&into));
    let size = T::DTYPE.size();
    assert!(f == r, "{name} -> {:?}: fast differs from reference at element {:?}", T::DTYPE, first_diff(&f, &r, size));
    assert!(i == r, "{name} -> {:?}: dequantize_into differs from reference at element {:?}", T::DTYPE, first_diff(&i, &r, size));
}

fn assert_fast_equals_reference_all_outputs(name: &str, q: &Quantized) {
    assert_fast_equals_reference::<f32>(name, q);
    assert_fast_equals_reference::<f16>(name, q);
    assert_fast_equals_reference::<bf16>(name, q);
}

#[test]
fn fast_dequantize_equals_reference_bit_for_bit() {
    let mut rng = Rng::fresh("roundtrip::fast_equals_reference");
    for c in combos() {
        for shape in SHAPES {
            let name = format!("{} {shape:?}", c.tag());
            let q = Data::random(&mut rng, c.dtype, shape.iter().product()).quantize(&name, shape, &c.opts());
            assert_fast_equals_reference_all_outputs(&name, &q);
        }
    }
}

#[test]
fn fast_dequantize_equals_reference_across_task_boundaries() {
    // The fast path hands 65536 elements to each task: cross that boundary (and end on a
    // partial block with a padding nibble), for every block size.
    let mut rng = Rng::fresh("roundtrip::fast_equals_reference_large");
    let n = 65536 + 101;
    for &blocksize in &BLOCKSIZES {
        for quant_type in QUANT_TYPES {
            for nested in [false, true] {
                let c = Combo { quant_type, blocksize, nested, dtype: FloatDtype::Bf16 };
                let name = format!("{} [{n}]", c.tag());
                let q = Data::random(&mut rng, c.dtype, n).quantize(&name, &[n], &c.opts());
                assert_fast_equals_reference::<bf16>(&name, &q);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// (c) accuracy

/// Half the largest gap between neighbouring values of a code book: the worst distance from
/// a value in [lo, hi] to its nearest code, when the book spans [lo, hi].
fn half_max_gap(code: &[f32]) -> f32 {
    let mut c = code.to_vec();
    c.sort_by(f32::total_cmp);
    c.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0
}

/// Checks `|x - deq| <= bound` for every element, with the bound explained in the module
/// docs. Returns the first violation.
fn check_close(x: &[f32], deq: &[f32], q: &Quantized, out: FloatDtype) -> Result<(), String> {
    let s = &q.state;
    let bs = s.blocksize;
    assert_eq!(x.len(), deq.len());
    // The 4-bit code's worst error, as a fraction of the block's absmax. Both code books
    // span [-1, 1] exactly, so half the largest gap covers every normalised value.
    let g4 = half_max_gap(s.quant_type.code());
    let absmax: Vec<f32> = x.chunks(bs).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
    // The nested absmax is `absmax - offset` quantized to 8 bits in groups of 256 blocks: its
    // error is half the dynamic map's largest gap (the map starts at -0.993, so -1 is that
    // far from its nearest code too) times the group's largest |absmax - offset|.
    let nested_err: Vec<f32> = if s.absmax.is_nested() {
        let map = nf4::codes::dynamic_map();
        let g8 = half_max_gap(&map).max(1.0 + map[0]);
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        absmax
            .chunks(NESTED_BLOCKSIZE)
            .flat_map(|group| {
                let spread = group.iter().fold(0f32, |m, &a| m.max((a - offset).abs()));
                let top = group.iter().fold(0f32, |m, &a| m.max(a));
                // A few f32 roundings (the centring, the scale, the add) on top.
                let e = g8 * spread * 1.0001 + 8.0 * f32::EPSILON * (top + offset.abs());
                std::iter::repeat_n(e, group.len())
            })
            .collect()
    } else {
        vec![0.0; absmax.len()]
    };
    // Rounding of the f32 product to the output type: half an ulp, relative, plus half the
    // smallest subnormal step for results that land there.
    let (rel, abs) = match out {
        FloatDtype::F32 => (2f32.powi(-24), f32::from_bits(1)),
        FloatDtype::F16 => (2f32.powi(-11), 2f32.powi(-25)),
        FloatDtype::Bf16 => (2f32.powi(-8), f32::from_bits(1)),
    };
    for (i, (&xi, &di)) in x.iter().zip(deq).enumerate() {
        let b = i / bs;
        let (a, e) = (absmax[b], nested_err[b]);
        // (1 + 1e-5): the quantizer compares x * (1/absmax), a few ulps off x / absmax.
        let bound = (a * g4 + e) * (1.0 + 1e-5) + (a + e) * (rel + 2.0 * f32::EPSILON) + abs;
        let err = (xi - di).abs();
        // NaN must fail too.
        if err.is_nan() || err > bound {
            return Err(format!(
                "element {i} (block {b}): input {xi:e}, dequantized {di:e}, error {err:e} > bound {bound:e} \
                 (block absmax {a:e}, nested error allowance {e:e})"
            ));
        }
    }
    Ok(())
}

#[test]
fn dequantized_values_are_within_half_a_code_gap() {
    let mut rng = Rng::fresh("roundtrip::accuracy");
    for c in combos() {
        for shape in SHAPES {
            let name = format!("{} {shape:?}", c.tag());
            let data = Data::random(&mut rng, c.dtype, shape.iter().product());
            let x = data.values();
            let q = data.quantize(&name, shape, &c.opts());
            // In the tensor's own dtype (what bitsandbytes returns) and in f32 (tightest).
            for out in [c.dtype, FloatDtype::F32] {
                let deq = dequant_values(&name, &q, out);
                check_close(&x, &deq, &q, out).unwrap_or_else(|e| panic!("{name} -> {out:?}: {e}"));
            }
        }
    }
}

#[test]
fn accuracy_check_catches_swapped_nibbles_and_wrong_blocks() {
    // The bound above is only worth something if it fails on a real layout bug.
    let mut rng = Rng::fresh("roundtrip::accuracy_check_is_meaningful");
    for quant_type in QUANT_TYPES {
        for nested in [false, true] {
            let c = Combo { quant_type, blocksize: 64, nested, dtype: FloatDtype::F32 };
            let name = c.tag();
            // Blocks at very different scales, so that borrowing a neighbour's absmax shows.
            let x: Vec<f32> = (0..1001)
                .map(|i| (rng.normal() * if (i / 64) % 2 == 0 { 1.0 } else { 8.0 }) as f32)
                .collect();
            let q = Data::F32(x.clone()).quantize(&name, &[1001], &c.opts());
            check_close(&x, &dequant_values(&name, &q, FloatDtype::F32), &q, FloatDtype::F32)
                .unwrap_or_else(|e| panic!("{name}: the unmodified tensor must pass: {e}"));

            let mut swapped = q.clone();
            swapped.packed.iter_mut().for_each(|b| *b = b.rotate_left(4));
            let deq = dequant_values(&name, &swapped, FloatDtype::F32);
            assert!(check_close(&x, &deq, &q, FloatDtype::F32).is_err(), "{name}: swapped nibbles went unnoticed");

            let mut shifted = q.clone();
            match &mut shifted.state.absmax {
                Absmax::Plain(v) => v.rotate_left(1),
                Absmax::Nested { q, .. } => q.rotate_left(1),
            }
            let deq = dequant_values(&name, &shifted, FloatDtype::F32);
            assert!(check_close(&x, &deq, &q, FloatDtype::F32).is_err(), "{name}: absmax of the wrong block went unnoticed");
        }
    }
}

// ---------------------------------------------------------------------------------------
// (d) nibble order

#[test]
fn both_nibble_positions_decode_to_their_own_element() {
    // Even elements large and positive, odd ones small and negative: a swap flips signs.
    for c in combos() {
        let n = 2 * c.blocksize + 5;
        let x: Vec<f32> = (0..n)
            .map(|i| {
                let k = (i / 2) as f32;
                if i % 2 == 0 { 3.0 - 0.1 * (k % 4.0) } else { -1.0 - 0.05 * (k % 3.0) }
            })
            .collect();
        let data = Data::from_f32(c.dtype, &x);
        let x = data.values();
        let name = c.tag();
        let q = data.quantize(&name, &[n], &c.opts());

        // The packed byte: element 0 in the high nibble, element 1 in the low one. (The
        // normalised values sit far from every threshold, so how exactly the quantizer
        // rounds 1/absmax cannot change these codes.)
        let a = x[..c.blocksize].iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / a;
        let (c0, c1) = (c.quant_type.quantize(x[0] * inv), c.quant_type.quantize(x[1] * inv));
        assert_ne!(c0, c1, "{name}: test data must give different codes");
        assert_eq!(q.packed[0], (c0 << 4) | c1, "{name}: byte 0 = {:08b}, want hi {c0:04b} lo {c1:04b}", q.packed[0]);

        for reference in [false, true] {
            let bytes = dequant_bytes(&name, &q.packed, &q.state, reference);
            let deq: Vec<f32> = match c.dtype {
                FloatDtype::F32 => from_bytes::<f32>(&bytes),
                FloatDtype::F16 => from_bytes::<f16>(&bytes).into_iter().map(|v| v.to_f32()).collect(),
                FloatDtype::Bf16 => from_bytes::<bf16>(&bytes).into_iter().map(|v| v.to_f32()).collect(),
            };
            for i in 0..n {
                assert!(
                    (deq[i] > 0.0) == (i % 2 == 0),
                    "{name} (reference={reference}): element {i} = {} decoded as {}",
                    x[i],
                    deq[i]
                );
            }
            check_close(&x, &deq, &q, c.dtype).unwrap_or_else(|e| panic!("{name} (reference={reference}): {e}"));
        }
    }
}

#[test]
fn hand_packed_bytes_decode_high_nibble_first() {
    // Independent of the quantizer: byte 0xF0 is (code 15, code 0), 0x0F the reverse.
    for quant_type in QUANT_TYPES {
        let code = quant_type.code();
        for (byte, want) in [(0xF0u8, [code[15], code[0]]), (0x0F, [code[0], code[15]]), (0x7A, [code[7], code[10]])] {
            let state = QuantState {
                quant_type,
                blocksize: 64,
                dtype: FloatDtype::F32,
                shape: vec![2],
                code: *code,
                absmax: Absmax::Plain(vec![2.0]),
                storage: nf4::PackedStorage::default_for(2),
            };
            for reference in [false, true] {
                let got: Vec<f32> = if reference {
                    nf4::dequantize_reference("hand", &[byte], &state)
                } else {
                    nf4::dequantize("hand", &[byte], &state)
                }
                .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got, vec![want[0] * 2.0, want[1] * 2.0], "{quant_type:?} byte {byte:#04x} (reference={reference})");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// (e) the padding nibble

#[test]
fn odd_sizes_pad_the_last_low_nibble_with_the_code_of_zero() {
    let mut rng = Rng::fresh("roundtrip::padding_nibble");
    for c in combos() {
        for shape in SHAPES {
            let n: usize = shape.iter().product();
            if n % 2 == 0 {
                continue;
            }
            let name = format!("{} {shape:?}", c.tag());
            let data = Data::random(&mut rng, c.dtype, n);
            let x = data.values();
            let q = data.quantize(&name, shape, &c.opts());
            assert_eq!(q.state.packed_len(), n.div_ceil(2));
            let last_block = &x[(n - 1) / c.blocksize * c.blocksize..];
            let want = padding_code(c.quant_type, last_block.iter().any(|&v| v != 0.0));
            let got = q.packed[q.state.packed_len() - 1] & 0x0f;
            assert_eq!(got, want, "{name}: padding nibble {got:04b}, want {want:04b}");
        }
    }
}

/// The code bitsandbytes gives the padding zero: 0 * (1/absmax). With absmax > 0 that is
/// 0.0 (nf4 code 7, fp4 code 0); with absmax 0 it is 0 * inf = NaN, which both trees send
/// to code 0.
fn padding_code(quant_type: QuantType, absmax_positive: bool) -> u8 {
    match (quant_type, absmax_positive) {
        (QuantType::Nf4, true) => 0b0111,
        _ => 0b0000,
    }
}

#[test]
fn odd_size_with_an_all_zero_last_block_pads_with_code_zero() {
    for c in combos() {
        let n = c.blocksize + 7; // last block: 7 zeros and the padding
        let mut x = vec![0f32; n];
        x[..c.blocksize].iter_mut().enumerate().for_each(|(i, v)| *v = (i as f32 - 20.0) / 16.0);
        let name = c.tag();
        let q = Data::from_f32(c.dtype, &x).quantize(&name, &[n], &c.opts());
        let last = q.packed[q.state.packed_len() - 1];
        assert_eq!(last & 0x0f, padding_code(c.quant_type, false), "{name}: last byte {last:08b}");
    }
}

// ---------------------------------------------------------------------------------------
// (f) zeros

#[test]
fn zero_blocks_dequantize_to_zero_without_error() {
    let mut rng = Rng::fresh("roundtrip::zero_blocks");
    let dir = TmpDir::new("zeros");
    for c in combos() {
        let bs = c.blocksize;
        // An all-zero tensor (odd length, several blocks).
        let n = 2 * bs + 3;
        let name = format!("{} zeros", c.tag());
        let q = Data::from_f32(c.dtype, &vec![0.0; n]).quantize(&name, &[n], &c.opts());
        // bitsandbytes' 0 * inf = NaN -> code 0, for every element and the padding.
        assert!(q.packed[..q.state.packed_len()].iter().all(|&b| b == 0), "{name}: zeros pack to code 0");
        for out in DTYPES {
            let deq = dequant_values(&name, &q, out);
            assert!(deq.iter().all(|&v| v == 0.0), "{name} -> {out:?}: {:?}", deq.iter().find(|v| **v != 0.0));
        }
        assert_fast_equals_reference_all_outputs(&name, &q);
        checkpoint_round_trip(&dir, &c.tag(), &[(name.replace(' ', "."), q)]);

        // A zero block between random ones.
        let name = format!("{} zero middle block", c.tag());
        let mut x = Data::random(&mut rng, c.dtype, 3 * bs).values();
        x[bs..2 * bs].fill(0.0);
        let data = Data::from_f32(c.dtype, &x);
        let q = data.quantize(&name, &[3 * bs], &c.opts());
        let x = data.values();
        let deq = dequant_values(&name, &q, c.dtype);
        let middle = &deq[bs..2 * bs];
        // The block decodes to code[0] * its absmax. Plain: the absmax is exactly 0. Nested:
        // it is the 8-bit approximation of 0, so with nf4 (code 0 is -1.0) the zeros come back
        // as minus that small error, exactly as bitsandbytes returns them; fp4's code 0 is 0.
        if !c.nested || c.quant_type == QuantType::Fp4 {
            assert!(middle.iter().all(|&v| v == 0.0), "{name}: {:?}", middle.iter().find(|v| **v != 0.0));
        }
        check_close(&x, &deq, &q, c.dtype).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

// ---------------------------------------------------------------------------------------
// (g) non-u8 storage

#[test]
fn wide_storage_dtypes_round_trip_with_bitsandbytes_shape() {
    // bitsandbytes' quant_storage (FSDP saves bf16): the same bytes, viewed as [bytes/size, 1].
    let mut rng = Rng::fresh("roundtrip::storage");
    let dir = TmpDir::new("storage");
    for c in combos() {
        // bf16 everywhere (what FSDP uses); f32 storage only with f32 inputs, to save time.
        let storages: &[safetensors::Dtype] =
            if c.dtype == FloatDtype::F32 { &[safetensors::Dtype::BF16, safetensors::Dtype::F32] } else { &[safetensors::Dtype::BF16] };
        for &storage in storages {
            let size = storage.bitsize() / 8;
            let mut weights = Vec::new();
            for (i, shape) in SHAPES.iter().enumerate() {
                let n: usize = shape.iter().product();
                let name = format!("model.layers.{i}.mlp.up_proj.weight");
                let data = Data::random(&mut rng, c.dtype, n);
                let u8q = data.quantize(&name, shape, &c.opts());
                let q = data.quantize(&name, shape, &QuantizeOptions { storage, ..c.opts() });
                let tag = format!("{} {storage:?} {shape:?}", c.tag());

                let want_len = n.div_ceil(2).div_ceil(size) * size;
                assert_eq!(q.packed.len(), want_len, "{tag}: packed length");
                assert_eq!(q.state.storage.dtype, storage, "{tag}");
                assert_eq!(q.state.storage.shape, vec![want_len / size, 1], "{tag}: packed shape");
                // Same codes as u8 storage; the padding up to a whole element is zero.
                assert_eq!(q.packed[..u8q.packed.len()], u8q.packed[..], "{tag}: codes differ from u8 storage");
                assert!(q.packed[u8q.packed.len()..].iter().all(|&b| b == 0), "{tag}: padding must be zero");
                let mut same_state = q.state.clone();
                same_state.storage = u8q.state.storage.clone();
                assert!(same_state == u8q.state, "{tag}: only the storage may differ");
                assert_eq!(
                    dequant_bytes(&name, &q.packed, &q.state, false),
                    dequant_bytes(&name, &u8q.packed, &u8q.state, false),
                    "{tag}: storage changed the values"
                );
                weights.push((name, q));
            }
            let file = format!("{}_{storage:?}", c.tag());
            let path = checkpoint_round_trip(&dir, &file, &weights);
            // And the file holds what bitsandbytes expects to find.
            let ck = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            let st = ck.tensors().unwrap_or_else(|e| panic!("{file}: {e}"));
            for (name, q) in &weights {
                let t = st.tensor(name).unwrap_or_else(|e| panic!("{file}: {name}: {e}"));
                assert_eq!(t.dtype(), storage, "{file} {name}");
                assert_eq!(t.shape(), &[q.packed.len() / size, 1][..], "{file} {name}: shape in the file");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// (h) the quant-state JSON

/// A JSON object's entries in document order (serde_json's Map sorts them unless built with
/// `preserve_order`, so it cannot tell us the order).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = m.next_entry::<String, Value>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

const PLAIN_KEYS: [&str; 4] = ["quant_type", "blocksize", "dtype", "shape"];
const NESTED_KEYS: [&str; 7] = ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"];

fn check_json(tag: &str, json: &str, state: &QuantState) {
    let _: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{tag}: not JSON ({e}): {json}"));
    let Entries(entries) = serde_json::from_str(json).unwrap_or_else(|e| panic!("{tag}: not a JSON object ({e}): {json}"));
    let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    let want: &[&str] = if state.absmax.is_nested() { &NESTED_KEYS } else { &PLAIN_KEYS };
    assert_eq!(keys, want, "{tag}: keys and their order: {json}");
    let get = |k: &str| &entries.iter().find(|(key, _)| key == k).expect("key checked above").1;
    assert_eq!(get("quant_type").as_str(), Some(state.quant_type.name()), "{tag}: {json}");
    assert_eq!(get("blocksize").as_u64(), Some(state.blocksize as u64), "{tag}: {json}");
    assert_eq!(get("dtype").as_str(), Some(state.dtype.bnb_name()), "{tag}: {json}");
    let shape: Option<Vec<u64>> = get("shape").as_array().and_then(|a| a.iter().map(Value::as_u64).collect());
    assert_eq!(shape, Some(state.shape.iter().map(|&d| d as u64).collect()), "{tag}: {json}");
    if let Absmax::Nested { offset, blocksize2, .. } = &state.absmax {
        assert_eq!(get("nested_blocksize").as_u64(), Some(*blocksize2 as u64), "{tag}: {json}");
        assert_eq!(get("nested_dtype").as_str(), Some("float32"), "{tag}: {json}");
        let back = get("nested_offset").as_f64().unwrap_or_else(|| panic!("{tag}: nested_offset is not a number: {json}"));
        assert_eq!((back as f32).to_bits(), offset.to_bits(), "{tag}: nested_offset {offset:e} came back as {back:e}: {json}");
    }
}

#[test]
fn quant_state_json_has_bitsandbytes_keys_in_order() {
    let mut rng = Rng::fresh("roundtrip::quant_state_json");
    for c in combos() {
        for shape in SHAPES {
            let tag = format!("{} {shape:?}", c.tag());
            let q = Data::random(&mut rng, c.dtype, shape.iter().product()).quantize(&tag, shape, &c.opts());
            let json = quant_state_json(&q.state);
            check_json(&tag, &json, &q.state);
            // to_tensors stores exactly that text under the key named after the quant type.
            let key = format!("w.quant_state.bitsandbytes__{}", c.quant_type.name());
            let stored = to_tensors("w", &q).expect("to_tensors").into_iter().find(|t| t.0 == key).unwrap_or_else(|| panic!("{tag}: no {key}"));
            assert_eq!((stored.1, stored.2.clone()), (safetensors::Dtype::U8, vec![json.len()]), "{tag}: {key}");
            assert_eq!(stored.3, json.as_bytes(), "{tag}: {key} bytes");
        }
    }
}

#[test]
fn nested_offset_survives_json_for_any_finite_f32() {
    // The offset is printed as the shortest decimal that round-trips the f64 of the f32
    // (Python's repr): it must come back with the same bits, whatever its magnitude.
    let mut rng = Rng::fresh("roundtrip::nested_offset_bits");
    let mut offsets = vec![
        0.0,
        -0.0,
        0.1,
        1.0 / 3.0,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::MAX,
        f32::MIN,
        1e-7,
        123_456.79,
        0.051_633_2,
    ];
    offsets.extend((0..2000).map(|_| f32::from_bits(rng.next_u64() as u32)).filter(|v| v.is_finite()));
    for offset in offsets {
        let state = QuantState {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            dtype: FloatDtype::Bf16,
            shape: vec![64],
            code: *QuantType::Nf4.code(),
            absmax: QuantState::nested_default(vec![0], vec![1.0], offset),
            storage: nf4::PackedStorage::default_for(64),
        };
        let json = quant_state_json(&state);
        check_json(&format!("offset {offset:e} ({:#010x})", offset.to_bits()), &json, &state);
    }
}

#[test]
fn quant_state_json_matches_what_bitsandbytes_wrote_byte_for_byte() {
    // Real files written by bitsandbytes/transformers: reading their state and writing it
    // again must reproduce their JSON text exactly (keys, order, spacing, number format).
    let mut checked = 0;
    for file in ["tiny_llama_nf4dq.safetensors", "tiny_llama_fp4bf16.safetensors", "nf4_fixtures.safetensors"] {
        let ck = Checkpoint::open(fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let st = ck.tensors().unwrap_or_else(|e| panic!("{file}: {e}"));
        for w in ck.quantized_weights().unwrap_or_else(|e| panic!("{file}: {e}")) {
            let q = ck.read(&w).unwrap_or_else(|e| panic!("{file} {w}: {e}"));
            let key = format!("{w}.quant_state.bitsandbytes__{}", q.state.quant_type.name());
            let theirs = st.tensor(&key).unwrap_or_else(|e| panic!("{file}: {key}: {e}"));
            let theirs = std::str::from_utf8(theirs.data()).unwrap_or_else(|e| panic!("{file}: {key}: {e}"));
            assert_eq!(quant_state_json(&q.state), theirs, "{file} {w}");
            check_json(&format!("{file} {w}"), theirs, &q.state);
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} quant states in the fixtures");
}

#[test]
fn empty_tensors_round_trip_or_are_refused() {
    // A zero-element tensor (bitsandbytes models have none, but shapes like [0, n] occur
    // in code): quantize may refuse it, but what it returns must dequantize and save.
    let dir = TmpDir::new("empty");
    for nested in [false, true] {
        for shape in [&[0usize][..], &[0, 64]] {
            let c = Combo { quant_type: QuantType::Nf4, blocksize: 64, nested, dtype: FloatDtype::F32 };
            let name = format!("{} {shape:?}", c.tag());
            let q = match nf4::quantize::<f32>(&name, &[], shape, &c.opts()) {
                Ok(q) => q,
                Err(e) => {
                    assert!(e.to_string().contains(&name), "{name}: {e}");
                    continue;
                }
            };
            let deq: Vec<f32> = nf4::dequantize(&name, &q.packed, &q.state)
                .unwrap_or_else(|e| panic!("{name}: quantize returned a state that dequantize rejects: {e}"));
            assert!(deq.is_empty());
            checkpoint_round_trip(&dir, &format!("empty_{nested}_{}", shape.len()), &[("w".to_string(), q)]);
        }
    }
}
