//! Learning rate per optimizer step.

use crate::recipe::{ScheduleKind, ScheduleSpec};

/// A resolved schedule: the recipe's shape with the run's step count filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub warmup_steps: u64,
    pub warmup_from: f64,
    pub min_lr: f64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn new(spec: &ScheduleSpec, lr: f64, total_steps: u64) -> Self {
        let warmup_steps = spec.warmup.steps(total_steps);
        Self {
            kind: spec.kind,
            lr,
            warmup_steps: warmup_steps.min(total_steps),
            warmup_from: spec.warmup_from,
            min_lr: spec.min_lr,
            total_steps,
        }
    }

    /// Learning rate of the update that completes step `step` (1-based, as logged).
    ///
    /// Warmup rises linearly from `warmup_from` (Graphcore's warmup-from-min; 0 gives HF's
    /// warmup) so that the first update uses `warmup_from + (lr - warmup_from) / warmup` and step
    /// `warmup` reaches `lr`. The decay then goes from `lr` at the end of warmup to `min_lr` at
    /// the last step.
    pub fn lr_at(&self, step: u64) -> f64 {
        let step = step.max(1);
        if step <= self.warmup_steps {
            let progress = step as f64 / self.warmup_steps as f64;
            return self.warmup_from + (self.lr - self.warmup_from) * progress;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 {
            return self.lr;
        }
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let span = self.lr - self.min_lr;
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Linear => self.lr - span * progress,
            ScheduleKind::Cosine => {
                self.min_lr + span * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::recipe::Warmup;

    fn schedule(kind: ScheduleKind, warmup: Warmup, from: f64, min_lr: f64) -> Schedule {
        let spec = ScheduleSpec {
            kind,
            warmup,
            warmup_from: from,
            min_lr,
        };
        Schedule::new(&spec, 1e-3, 100)
    }

    #[test]
    fn constant_without_warmup_is_flat() {
        let s = schedule(ScheduleKind::Constant, Warmup::Steps(0), 0.0, 0.0);
        assert_eq!(s.lr_at(1), 1e-3);
        assert_eq!(s.lr_at(100), 1e-3);
    }

    #[test]
    fn warmup_from_min_rises_linearly_to_lr() {
        let s = schedule(ScheduleKind::Linear, Warmup::Steps(10), 1e-7, 0.0);
        assert!((s.lr_at(1) - (1e-7 + (1e-3 - 1e-7) * 0.1)).abs() < 1e-15);
        assert!((s.lr_at(5) - (1e-7 + (1e-3 - 1e-7) * 0.5)).abs() < 1e-15);
        assert_eq!(s.lr_at(10), 1e-3);
        // Linear decay to 0 over the remaining 90 steps.
        assert!((s.lr_at(55) - 0.5e-3).abs() < 1e-15);
        assert!(s.lr_at(100).abs() < 1e-15);
    }

    #[test]
    fn cosine_ends_at_min_lr_and_fraction_warmup_resolves() {
        let s = schedule(ScheduleKind::Cosine, Warmup::Fraction(0.1), 0.0, 1e-5);
        assert_eq!(s.warmup_steps, 10);
        assert!((s.lr_at(55) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-12);
        assert!((s.lr_at(100) - 1e-5).abs() < 1e-15);
    }

    /// `0.006 × 200 = 1.2`: rounded up to 2 steps, as `kiln recipe check` reports (rounding to
    /// nearest trained 1).
    #[test]
    fn fractional_warmup_rounds_up_like_recipe_check() {
        let spec = ScheduleSpec {
            kind: ScheduleKind::Linear,
            warmup: Warmup::Fraction(0.006),
            warmup_from: 0.0,
            min_lr: 0.0,
        };
        let s = Schedule::new(&spec, 1e-3, 200);
        assert_eq!(s.warmup_steps, 2);
        assert_eq!(s.warmup_steps, spec.warmup.steps(200));
        assert_eq!(s.lr_at(1), 0.5e-3);
        assert_eq!(s.lr_at(2), 1e-3);
    }
}
