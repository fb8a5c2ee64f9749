//! The learning-rate schedule: linear warmup, then cosine decay to zero.

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to 0 at `total`:
/// transformers' `get_cosine_schedule_with_warmup`, step for step (so the first step of a
/// warmup runs at learning rate 0, as there).
///
/// ```
/// use lora_runtime::train::LrSchedule;
/// let s = LrSchedule::new(1e-3, 10, 110);
/// assert_eq!(s.lr(0), 0.0);
/// assert!((s.lr(5) - 5e-4).abs() < 1e-12);
/// assert!((s.lr(10) - 1e-3).abs() < 1e-12);
/// assert!((s.lr(60) - 5e-4).abs() < 1e-12);
/// assert!(s.lr(110).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The learning rate after warmup.
    pub peak: f64,
    /// Warmup steps.
    pub warmup: u64,
    /// Total optimizer steps of the run.
    pub total: u64,
}

impl LrSchedule {
    /// The schedule of a run of `total` steps.
    pub const fn new(peak: f64, warmup: u64, total: u64) -> Self {
        Self {
            peak,
            warmup,
            total,
        }
    }

    /// A constant learning rate.
    pub const fn constant(lr: f64) -> Self {
        Self {
            peak: lr,
            warmup: 0,
            total: 0,
        }
    }

    /// The learning rate of optimizer step `step` (0 for the first).
    pub fn lr(&self, step: u64) -> f64 {
        if self.total == 0 {
            return self.peak;
        }
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let progress =
            (step - self.warmup) as f64 / self.total.saturating_sub(self.warmup).max(1) as f64;
        self.peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
    }
}
