//! Our CPU quantizer and dequantizers against outputs of real bitsandbytes 0.50.2 (CUDA,
//! H100), produced by `nf4/py/make_fixtures.py` and committed under `tests/fixtures/`.

mod common;

use common::*;
use half::{bf16, f16};
use nf4::quantize::{mean_f32, quantize_nested_absmax};
use nf4::{Absmax, Checkpoint, FloatDtype, QuantizeOptions, Quantized};

fn cases(ck: &Checkpoint) -> Vec<String> {
    let m = ck.metadata().expect("fixture metadata");
    serde_json::from_str(&m["cases"]).unwrap()
}

#[test]
fn dynamic_map_matches_bitsandbytes() {
    let ck = Checkpoint::open(fixture("nf4_fixtures.safetensors")).unwrap();
    let st = ck.tensors().unwrap();
    let t = st.tensor("dynamic_map").unwrap();
    let theirs: Vec<u32> = t.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(theirs, nf4::codes::DYNAMIC_MAP_BITS.to_vec());
}

#[test]
fn dequantize_matches_bitsandbytes_bit_for_bit() {
    let ck = Checkpoint::open(fixture("nf4_fixtures.safetensors")).unwrap();
    let st = ck.tensors().unwrap();
    let cases = cases(&ck);
    assert!(cases.len() >= 39, "fixture lists {} cases", cases.len());
    for case in &cases {
        let w = format!("{case}.weight");
        let q = ck.read(&w).unwrap_or_else(|e| panic!("{case}: {e}"));
        let want = st.tensor(&format!("{case}.dequant")).unwrap();
        assert_eq!(want.shape(), &q.state.output_shape()[..], "{case}: output shape");
        for reference in [false, true] {
            let got = dequant_bytes(&w, &q.packed, &q.state, reference);
            assert!(
                got == want.data(),
                "{case} (reference={reference}): first differing element {:?}",
                first_diff(&got, want.data(), q.state.dtype.size())
            );
        }
    }
}

fn requantize(case: &str, st: &safetensors::SafeTensors<'_>, q: &Quantized) -> Quantized {
    let input = st.tensor(&format!("{case}.input")).unwrap();
    let opts = QuantizeOptions {
        quant_type: q.state.quant_type,
        blocksize: q.state.blocksize,
        nested: q.state.absmax.is_nested(),
        storage: q.state.storage.dtype,
    };
    let shape = input.shape().to_vec();
    match FloatDtype::from_safetensors(input.dtype()).unwrap() {
        FloatDtype::F32 => nf4::quantize(case, &from_bytes::<f32>(input.data()), &shape, &opts),
        FloatDtype::F16 => nf4::quantize(case, &from_bytes::<f16>(input.data()), &shape, &opts),
        FloatDtype::Bf16 => nf4::quantize(case, &from_bytes::<bf16>(input.data()), &shape, &opts),
    }
    .unwrap_or_else(|e| panic!("{case}: {e}"))
}

#[test]
fn quantize_matches_bitsandbytes_bit_for_bit() {
    let ck = Checkpoint::open(fixture("nf4_fixtures.safetensors")).unwrap();
    let st = ck.tensors().unwrap();
    let mut offsets_exact = 0;
    let mut nested_cases = 0;
    for case in &cases(&ck) {
        let theirs = ck.read(&format!("{case}.weight")).unwrap();
        let ours = requantize(case, &st, &theirs);
        assert_eq!(ours.state.dtype, theirs.state.dtype, "{case}: dtype");
        assert_eq!(ours.state.shape, theirs.state.shape, "{case}: shape");
        assert_eq!(ours.state.storage, theirs.state.storage, "{case}: packed storage dtype/shape");
        assert_eq!(ours.state.code, theirs.state.code, "{case}: quant_map");
        let n = theirs.state.packed_len();
        assert!(ours.packed[..n] == theirs.packed[..n], "{case}: packed codes differ at byte {:?}", first_diff(&ours.packed, &theirs.packed, 1));
        // The un-nested absmax, bit for bit.
        let absmax_fp32 = f32s(st.tensor(&format!("{case}.absmax_fp32")).unwrap().data());
        match (&ours.state.absmax, &theirs.state.absmax) {
            (Absmax::Plain(a), Absmax::Plain(b)) => {
                assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{case}: absmax");
            }
            (Absmax::Nested { offset: our_off, .. }, Absmax::Nested { q, absmax2, offset, blocksize2, code2 }) => {
                nested_cases += 1;
                assert_eq!(*blocksize2, 256);
                assert_eq!(code2.map(f32::to_bits), nf4::codes::DYNAMIC_MAP_BITS, "{case}: nested_quant_map");
                // PyTorch's CUDA tree sum is modelled by the exact sum: equal on these fixtures.
                let ulps = (our_off.to_bits() as i64 - offset.to_bits() as i64).abs();
                assert!(ulps <= 1, "{case}: offset {our_off:e} vs bitsandbytes {offset:e} ({ulps} ulp)");
                offsets_exact += (ulps == 0) as usize;
                assert_eq!(mean_f32(&absmax_fp32).to_bits(), our_off.to_bits());
                // Given their offset, the nested codes and scales are bit-identical.
                let (q2, a2) = quantize_nested_absmax(&absmax_fp32, *offset);
                assert_eq!(&q2, q, "{case}: nested absmax codes");
                assert_eq!(a2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), absmax2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{case}: nested_absmax");
            }
            _ => panic!("{case}: nesting differs"),
        }
    }
    eprintln!("nested offset bit-identical to bitsandbytes in {offsets_exact} of {nested_cases} cases");
    assert!(nested_cases >= 20);
    assert_eq!(offsets_exact, nested_cases, "every fixture's offset is reproduced exactly");
}

#[test]
fn transformers_saved_checkpoints_load_and_dequantize_bit_for_bit() {
    for tag in ["nf4dq", "fp4bf16"] {
        let ck = Checkpoint::open(fixture(&format!("tiny_llama_{tag}.safetensors"))).unwrap();
        let refs = Checkpoint::open(fixture(&format!("tiny_llama_{tag}_dequant.safetensors"))).unwrap();
        let refs_st = refs.tensors().unwrap();
        let weights = ck.quantized_weights().unwrap();
        assert_eq!(weights.len(), 7, "{tag}: the 7 projections of the one layer: {weights:?}");
        for w in &weights {
            let q = ck.read(w).unwrap_or_else(|e| panic!("{tag} {w}: {e}"));
            assert_eq!(q.state.absmax.is_nested(), tag == "nf4dq");
            if tag == "fp4bf16" {
                assert_eq!(q.state.storage.dtype, safetensors::Dtype::BF16);
            }
            let want = refs_st.tensor(&format!("{w}.dequant")).unwrap();
            let got = dequant_bytes(w, &q.packed, &q.state, false);
            assert!(got == want.data(), "{tag} {w}: first diff {:?}", first_diff(&got, want.data(), 2));
        }
    }
}
