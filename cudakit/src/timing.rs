//! Timing GPU work with CUDA events, and the statistics we report.

use cudarc::driver::sys;
use cudarc::driver::CudaStream;

use crate::GpuError;

/// Median of a sample (sorts it). `NaN` for an empty sample.
pub fn median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        0.5 * (xs[m - 1] + xs[m])
    }
}

/// Times `f` (which must enqueue its work on `stream`) with CUDA events: `warmup` untimed
/// calls, then `reps` timed ones, each between its own pair of events. Returns each
/// call's time in microseconds. `f` gets the repetition index, to rotate inputs.
pub fn time_us<F>(stream: &CudaStream, warmup: usize, reps: usize, mut f: F) -> Result<Vec<f64>, GpuError>
where
    F: FnMut(usize) -> Result<(), GpuError>,
{
    let ctx = stream.context();
    for i in 0..warmup {
        f(i)?;
    }
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut pairs = Vec::with_capacity(reps);
    for i in 0..reps {
        let a = ctx.new_event(flags).map_err(GpuError::driver("cuEventCreate"))?;
        let b = ctx.new_event(flags).map_err(GpuError::driver("cuEventCreate"))?;
        a.record(stream).map_err(GpuError::driver("cuEventRecord"))?;
        f(warmup + i)?;
        b.record(stream).map_err(GpuError::driver("cuEventRecord"))?;
        pairs.push((a, b));
    }
    stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
    pairs
        .iter()
        .map(|(a, b)| a.elapsed_ms(b).map(|ms| ms as f64 * 1e3).map_err(GpuError::driver("cuEventElapsedTime")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty_samples() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
