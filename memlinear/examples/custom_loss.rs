//! A loss of your own, end to end: write its forward, get exact chunked gradients on the CPU
//! and, when a GPU is present, from a CUDA kernel generated from the same expression.
//!
//!     cargo run --release -p memlinear --example custom_loss
//!
//! The loss here is a focal loss with label smoothing against a uniform prior, something no
//! built-in provides: nothing in memlinear knows it, and no derivative is written.

use memlinear::gpu::{DeviceGrads, DeviceHead, DeviceProblem, GradBuf};
use memlinear::{cpu, Chunk, Head, Loss, Options, Problem, Reduction};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let focal = Loss::new("smoothed_focal", |b| {
        let lp = b.logits().log_softmax(); // row: log-probabilities
        let p_t = lp.at_target().exp(); // scalar: probability of the target
        let focal = -((1.0 - p_t).square() * lp.at_target());
        let prior = -lp.mean(); // cross-entropy against the uniform distribution
        0.9 * focal + 0.1 * prior
    })?;
    println!("forward and derived gradient ({} pass(es) over each row before the gradient pass):\n{}", focal.passes(), focal.dump());

    let (t, h, v) = (256, 64, 5003);
    let mut s = 1u64;
    let mut rnd = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let x: Vec<f32> = (0..t * h).map(|_| rnd() * 3.0).collect();
    let w: Vec<f32> = (0..v * h).map(|_| rnd() * 0.4).collect();
    let targets: Vec<i64> = (0..t).map(|i| if i % 10 == 0 { -100 } else { (i * 37 % v) as i64 }).collect();
    let p = Problem::new(t, v, Head::new(&x, &w, h)).targets(&targets, -100);

    let chunked = cpu::run(&p, &focal, &Options { chunk: Chunk::Tokens(37), ..Default::default() })?;
    let reference = cpu::reference(&p, &focal, &Options::default())?;
    let dw_err = chunked.dw.as_ref().expect("dw").iter().zip(&reference.dw).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
    println!("CPU, chunks of {}: loss {:.6} (unchunked f64 reference {:.6}), max |dW - reference| = {dw_err:.2e}", chunked.chunk_tokens, chunked.loss, reference.loss);

    match cudakit::Gpu::open(0) {
        Err(e) => println!("GPU: skipped ({e})"),
        Ok(gpu) => {
            let st = gpu.stream();
            let (xd, wd, td) = (st.clone_htod(&x)?, st.clone_htod(&w)?, st.clone_htod(&targets)?);
            let mut dx = st.alloc_zeros::<f32>(t * h)?;
            let mut dw = st.alloc_zeros::<f32>(v * h)?;
            let dp = DeviceProblem {
                tokens: t,
                vocab: v,
                student: DeviceHead { x: &xd, w: &wd, bias: None, hidden: h },
                teacher: None,
                targets: Some(&td),
                ignore_index: -100,
                token_params: vec![],
                class_params: vec![],
                grad_tokens: None,
            };
            let out = memlinear::gpu::run(&gpu, &focal, &dp, Reduction::Mean(None), Chunk::Tokens(37), DeviceGrads { dx: Some(&mut dx), dw: Some(GradBuf::F32(&mut dw)), db: None, accumulate: false })?;
            println!("GPU ({}): loss {:.6}", gpu.info().name, out.loss);
        }
    }
    Ok(())
}
