//! Prints the CUDA kernel generated for a loss: `cargo run -p memlinear --example show_kernel [ce|kl|policy|focal]`.
use memlinear::codegen::{generate, Spec};
use memlinear::losses::{self, CrossEntropy, Divergence, Policy};
use memlinear::{Dtype, Loss};

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "ce".into());
    let loss = match which.as_str() {
        "ce" => losses::cross_entropy(&CrossEntropy::default()),
        "kl" => losses::distillation(Divergence::ForwardKl, 1.0),
        "policy" => losses::policy(&Policy::default()),
        "focal" => Loss::new("focal", |b| {
            let lp = b.logits().log_softmax().at_target();
            -((1.0 - lp.exp()).square() * lp)
        })
        .expect("a well-formed loss"),
        other => {
            eprintln!("unknown loss `{other}`: ce, kl, policy or focal");
            std::process::exit(2);
        }
    };
    let spec = Spec::passes(Dtype::Bf16, 128256, true, false, false, true, memlinear::codegen::BLOCK);
    print!("{}", generate(&loss, spec));
}
