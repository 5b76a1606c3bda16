//! Dynamic loss scaling for fp16 compute (as `torch.amp.GradScaler`); fp32 and bf16 run unscaled.

use serde::{Deserialize, Serialize};

use crate::recipe::{Compute, PrecisionSpec};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Multiplier applied to the loss before backward; 1 when scaling is off.
    pub scale: f64,
    /// Clean (finite-gradient) steps since the scale last changed.
    pub growth_tracker: u64,
    pub growth_interval: u64,
    pub enabled: bool,
}

/// What the scaler decided after looking at one step's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepVerdict {
    Apply,
    /// Gradients overflowed: skip the update (the scale was halved).
    Skip,
}

impl LossScaler {
    pub fn new(spec: &PrecisionSpec) -> Self {
        let enabled = spec.compute == Compute::Fp16;
        Self {
            scale: if enabled {
                spec.initial_loss_scale
            } else {
                1.0
            },
            growth_tracker: 0,
            growth_interval: spec.growth_interval.max(1),
            enabled,
        }
    }

    /// Records whether this step's gradients were finite and adjusts the scale: halve on
    /// overflow, double after `growth_interval` clean steps in a row.
    pub fn update(&mut self, grads_finite: bool) -> StepVerdict {
        if !self.enabled {
            return if grads_finite {
                StepVerdict::Apply
            } else {
                StepVerdict::Skip
            };
        }
        if !grads_finite {
            self.scale /= 2.0;
            self.growth_tracker = 0;
            return StepVerdict::Skip;
        }
        self.growth_tracker += 1;
        if self.growth_tracker >= self.growth_interval {
            self.scale *= 2.0;
            self.growth_tracker = 0;
        }
        StepVerdict::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_and_grows_after_clean_interval() {
        let spec = PrecisionSpec {
            compute: Compute::Fp16,
            initial_loss_scale: 1024.0,
            growth_interval: 3,
        };
        let mut s = LossScaler::new(&spec);
        assert_eq!(s.update(false), StepVerdict::Skip);
        assert_eq!(s.scale, 512.0);
        assert_eq!(s.update(true), StepVerdict::Apply);
        assert_eq!(s.update(true), StepVerdict::Apply);
        assert_eq!(s.scale, 512.0);
        assert_eq!(s.update(true), StepVerdict::Apply);
        assert_eq!(s.scale, 1024.0);
        assert_eq!(s.growth_tracker, 0);
    }

    #[test]
    fn bf16_and_fp32_never_scale() {
        let spec = PrecisionSpec {
            compute: Compute::Bf16,
            ..PrecisionSpec::default()
        };
        let mut s = LossScaler::new(&spec);
        assert_eq!(s.scale, 1.0);
        s.update(true);
        assert_eq!(s.scale, 1.0);
    }
}
