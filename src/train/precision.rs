//! Dynamic loss scaling for fp16 compute (as `torch.amp.GradScaler`); fp32 and bf16 run unscaled.
//!
//! The scaler's state is a type of the checkpoint format ([`crate::checkpoint::LossScaler`]),
//! so that checkpoints need nothing from the trainer; its behaviour is here.

pub use crate::checkpoint::LossScaler;
use crate::recipe::{Compute, PrecisionSpec};

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
            growth_factor: spec.growth_factor,
            backoff_factor: spec.backoff_factor,
            enabled,
        }
    }

    /// The scaler a resumed run continues with: the checkpoint's own when the compute precision
    /// is unchanged (its growth settings from the new recipe), else a fresh one for the new
    /// precision — a scale saved by an fp32 or bf16 run is 1 and disabled, which would train fp16
    /// unscaled. The message says what happened, for the user.
    pub fn resumed(saved: LossScaler, spec: &PrecisionSpec) -> (Self, Option<String>) {
        let fresh = Self::new(spec);
        if saved.enabled == fresh.enabled {
            let continued = Self {
                growth_interval: fresh.growth_interval,
                growth_factor: fresh.growth_factor,
                backoff_factor: fresh.backoff_factor,
                ..saved
            };
            return (continued, None);
        }
        let message = if fresh.enabled {
            format!(
                "resume: precision changed to fp16: dynamic loss scaling starts at \
                 precision.initial_loss_scale = {} (the checkpoint trained without scaling)",
                fresh.scale
            )
        } else {
            format!(
                "resume: precision changed from fp16 to {}: loss scaling is off (the checkpoint's \
                 scale {} is dropped)",
                spec.compute.name(),
                saved.scale
            )
        };
        (fresh, Some(message))
    }

    /// Records whether this step's gradients were finite and adjusts the scale (as torch's
    /// `GradScaler.update`): times `backoff_factor` on overflow, times `growth_factor` after
    /// `growth_interval` clean steps in a row. Without scaling (fp32, bf16) a non-finite step is
    /// a `Skip` too; the trainer stops there rather than skip.
    pub fn update(&mut self, grads_finite: bool) -> StepVerdict {
        if !self.enabled {
            return if grads_finite {
                StepVerdict::Apply
            } else {
                StepVerdict::Skip
            };
        }
        if !grads_finite {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            return StepVerdict::Skip;
        }
        self.growth_tracker += 1;
        if self.growth_tracker >= self.growth_interval {
            self.scale *= self.growth_factor;
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
            ..PrecisionSpec::default()
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

    #[test]
    fn custom_factors_and_precision_changes_on_resume() {
        let fp16 = PrecisionSpec {
            compute: Compute::Fp16,
            initial_loss_scale: 2f64.powi(40),
            growth_interval: 1,
            growth_factor: 4.0,
            backoff_factor: 2f64.powi(-30),
        };
        let mut s = LossScaler::new(&fp16);
        assert_eq!(s.update(false), StepVerdict::Skip);
        assert_eq!(s.scale, 1024.0);
        assert_eq!(s.update(true), StepVerdict::Apply);
        assert_eq!(s.scale, 4096.0);

        // fp32 → fp16: scaling starts as a fresh fp16 run's would, and the user is told.
        let fp32 = LossScaler::new(&PrecisionSpec::default());
        let (resumed, message) = LossScaler::resumed(fp32, &fp16);
        assert_eq!(resumed, LossScaler::new(&fp16));
        assert!(resumed.enabled && resumed.scale == 2f64.powi(40));
        assert!(message.unwrap().contains("precision changed to fp16"));

        // fp16 → bf16: scaling off.
        let bf16 = PrecisionSpec {
            compute: Compute::Bf16,
            ..PrecisionSpec::default()
        };
        let (resumed, message) = LossScaler::resumed(s, &bf16);
        assert!(!resumed.enabled && resumed.scale == 1.0);
        assert!(message.unwrap().contains("from fp16 to bf16"));

        // fp16 → fp16: the saved scale and tracker go on; growth settings are the recipe's.
        let slower = PrecisionSpec {
            growth_interval: 7,
            ..fp16.clone()
        };
        let (resumed, message) = LossScaler::resumed(s, &slower);
        assert_eq!((resumed.scale, resumed.growth_interval), (4096.0, 7));
        assert!(message.is_none());
    }
}
