//! One optimizer step over several micro-batches (gradient accumulation), with the loss
//! normalised by the global count of counted targets, global-norm clipping, the schedule,
//! and AdamW.
//!
//! Normalising every micro-batch by the step's total target count (not by its own) makes
//! the accumulated gradient equal to the gradient of the whole batch's mean loss, however
//! the batch is split: the rule a sharded run needs too (each rank passes the count over
//! all ranks).
//!
//! LoRA dropout (`lora.config.dropout > 0`) draws new masks for every micro-batch: the
//! seeds are [`StepDropout::new`]`(p, dropout_seed, step, micro)`, `micro` the
//! micro-batch's index within the optimizer step, the same function the GPU trainer uses.

use crate::batch::{count_targets, Batch};
use crate::dropout::StepDropout;
use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::model::Llama;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};

/// A micro-batch and its targets (usually [`Batch::next_token_targets`]).
#[derive(Clone, Debug)]
pub struct MicroBatch {
    /// The tokens.
    pub batch: Batch,
    /// One target per token, or [`crate::IGNORE_INDEX`].
    pub targets: Vec<i64>,
}

impl MicroBatch {
    /// Next-token prediction on `batch`.
    pub fn next_token(batch: Batch) -> MicroBatch {
        let targets = batch.next_token_targets();
        MicroBatch { batch, targets }
    }
}

/// Training hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// AdamW's.
    pub adamw: AdamWConfig,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// The run's seed of the LoRA dropout masks (see [`crate::dropout`]); unused when the
    /// adapters' dropout is 0.
    pub dropout_seed: u64,
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step's index (0-based).
    pub step: u64,
    /// Mean loss over the step's counted targets (before the update).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// Counted targets.
    pub targets: usize,
}

/// Adapters, their gradients and optimizer state.
#[derive(Clone, Debug)]
pub struct Trainer {
    /// The fp32 master weights of the adapters.
    pub lora: Lora,
    /// Gradient buffers (the adapters' layout).
    pub grads: Lora,
    /// Optimizer state.
    pub opt: AdamW,
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// Optimizer steps taken.
    pub step: u64,
}

impl Trainer {
    /// A trainer for `lora` (with its `dropout`, applied in training steps only).
    pub fn new(lora: Lora, config: TrainConfig) -> Result<Trainer> {
        lora.config.validate()?;
        Ok(Trainer { grads: lora.zeros_like(), opt: AdamW::new(config.adamw, &lora), lora, config, step: 0 })
    }

    /// The gradients of one step's micro-batches, accumulated into [`Trainer::grads`]
    /// (zeroed first); returns the mean loss and the number of counted targets.
    pub fn accumulate(&mut self, model: &Llama, micro: &[MicroBatch]) -> Result<(f64, usize)> {
        let total: usize = micro.iter().map(|m| count_targets(&m.targets)).sum();
        if total == 0 {
            return Err(Error::arg("micro", "no micro-batch has a counted target: nothing to learn from"));
        }
        self.grads.zero();
        let mut loss = 0.0;
        for (i, m) in micro.iter().enumerate() {
            let dropout = self.dropout(i);
            loss += model.step(&self.lora, &m.batch, &m.targets, total as f64, dropout, &mut self.grads)?.loss;
        }
        Ok((loss, total))
    }

    /// The LoRA dropout of micro-batch `micro` of the current step (`None` when the
    /// adapters' dropout is 0).
    pub fn dropout(&self, micro: usize) -> Option<StepDropout> {
        StepDropout::new(self.lora.config.dropout, self.config.dropout_seed, self.step, micro as u64)
    }

    /// One optimizer step: accumulate, clip, update.
    pub fn train_step(&mut self, model: &Llama, micro: &[MicroBatch]) -> Result<StepReport> {
        let (loss, targets) = self.accumulate(model, micro)?;
        let grad_norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(&mut self.grads, max),
            None => crate::optim::grad_norm(&self.grads),
        };
        let lr = self.config.schedule.lr(self.step);
        self.opt.step(&mut self.lora, &self.grads, lr);
        let report = StepReport { step: self.step, loss, grad_norm, lr, targets };
        self.step += 1;
        Ok(report)
    }
}
