//! Writes 4-bit checkpoints with this crate for bitsandbytes to load.
//!
//! `cargo run --release -p nf4 --example interop -- FILE` quantizes a few random tensors
//! (nf4/fp4, nested or not, f32/f16/bf16, a bf16 packed storage) and saves them under
//! bitsandbytes' keys, plus, for each weight `W`, `ref.W.input` (what was quantized) and
//! `ref.W.dequant` (our CPU dequantization). `nf4/py/interop_check.py FILE` then loads
//! every weight with bitsandbytes' `QuantState.from_dict` and checks that its
//! `dequantize_4bit` gives our bytes, and compares our quantization with theirs.

use half::{bf16, f16};
use nf4::checkpoint::{save, to_tensors, OwnedTensor};
use nf4::element::to_le_bytes;
use nf4::testing::Rng;
use nf4::{Element, QuantType, QuantizeOptions};

fn add<T: Element>(out: &mut Vec<OwnedTensor>, rng: &mut Rng, name: &str, shape: &[usize], opts: QuantizeOptions) -> nf4::Result<()> {
    let n: usize = shape.iter().product();
    let x: Vec<T> = rng.normal_vec(n, 0.03);
    let q = nf4::quantize(name, &x, shape, &opts)?;
    let back: Vec<T> = nf4::dequantize(name, &q.packed, &q.state)?;
    out.extend(to_tensors(name, &q)?);
    out.push((format!("ref.{name}.input"), T::DTYPE.safetensors(), shape.to_vec(), to_le_bytes(&x)));
    out.push((format!("ref.{name}.dequant"), T::DTYPE.safetensors(), q.state.output_shape(), to_le_bytes(&back)));
    Ok(())
}

fn main() -> nf4::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: interop FILE.safetensors");
        std::process::exit(2)
    });
    let mut rng = Rng::fresh("interop");
    let mut t = vec![];
    let o = |quant_type, blocksize, nested| QuantizeOptions { quant_type, blocksize, nested, ..Default::default() };
    add::<bf16>(&mut t, &mut rng, "a.nf4_bf16_bs64_nested", &[300, 257], o(QuantType::Nf4, 64, true))?;
    add::<f16>(&mut t, &mut rng, "b.fp4_f16_bs128_plain", &[77, 131], o(QuantType::Fp4, 128, false))?;
    add::<f32>(&mut t, &mut rng, "c.nf4_f32_bs256_nested", &[4096, 1024], o(QuantType::Nf4, 256, true))?;
    add::<bf16>(&mut t, &mut rng, "d.fp4_bf16_bs32_nested", &[1023, 65], o(QuantType::Fp4, 32, true))?;
    add::<bf16>(&mut t, &mut rng, "e.nf4_bf16_bs64_storage_bf16", &[64, 96], QuantizeOptions {
        storage: safetensors::Dtype::BF16,
        ..Default::default()
    })?;
    add::<bf16>(&mut t, &mut rng, "f.nf4_bf16_bs64_big", &[4096, 4096], o(QuantType::Nf4, 64, true))?;
    save(&path, &t, None)?;
    println!("wrote {path}: {} tensors", t.len());
    Ok(())
}
