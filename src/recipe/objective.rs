//! `objective:` what training minimises: next-token cross-entropy (`sft`, the default), or a
//! preference objective over `chosen` / `rejected` pairs, with TRL's names (and its defaults,
//! but for SimPO's `beta`, whose default is the paper's 2.0 rather than CPO's 0.1).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ObjectiveSpec {
    #[serde(default)]
    pub kind: ObjectiveKind,
    /// DPO: how far the policy may move from the reference (TRL's `beta`, default 0.1); for IPO
    /// its regularisation τ. SimPO: the reward scale (default 2.0, the paper's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// DPO's loss over the pair's margin (TRL's `loss_type`).
    #[serde(default, skip_serializing_if = "PreferenceLoss::is_sigmoid")]
    pub loss: PreferenceLoss,
    /// `loss: robust`: the probability that a pair's preference is flipped, in [0, 0.5); SimPO:
    /// the conservative smoothing of its labels (TRL's `label_smoothing`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub label_smoothing: f64,
    /// SimPO's target reward margin γ (TRL's `simpo_gamma`, default 0.5).
    #[serde(
        default,
        alias = "simpo_gamma",
        skip_serializing_if = "Option::is_none"
    )]
    pub gamma: Option<f64>,
    /// DPO: compute the reference's log-probabilities of every pair once, before the first
    /// step, and keep them with the run, so that no reference model is held while training
    /// (TRL's `precompute_ref_log_probs`).
    #[serde(
        default,
        alias = "precompute_reference",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub precompute_ref_log_probs: bool,
    /// Preference objectives train without dropout — the model's and LoRA's — as TRL's
    /// `disable_dropout` (default true) does, so that the policy starts equal to the reference.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub disable_dropout: bool,
}

impl Default for ObjectiveSpec {
    fn default() -> Self {
        Self {
            kind: ObjectiveKind::Sft,
            beta: None,
            loss: PreferenceLoss::Sigmoid,
            label_smoothing: 0.0,
            gamma: None,
            precompute_ref_log_probs: false,
            disable_dropout: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(x: &bool) -> bool {
    *x
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectiveKind {
    /// Next-token cross-entropy over the trained tokens.
    #[default]
    Sft,
    /// Direct Preference Optimization (Rafailov et al. 2023), against a frozen reference.
    Dpo,
    /// SimPO (Meng et al. 2024): length-normalised log-probabilities with a target margin, no
    /// reference model.
    Simpo,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PreferenceLoss {
    /// `-log σ(β·margin)`: DPO's own.
    #[default]
    Sigmoid,
    /// `max(0, 1 - β·margin)` (SLiC).
    Hinge,
    /// `(margin/length - 1/(2β))²` over length-averaged log-ratios (Azar et al. 2023, as TRL).
    Ipo,
    /// DPO robust to flipped labels (Chowdhury et al. 2024), with `label_smoothing`.
    Robust,
}

impl PreferenceLoss {
    pub fn is_sigmoid(&self) -> bool {
        *self == PreferenceLoss::Sigmoid
    }

    pub fn name(self) -> &'static str {
        match self {
            PreferenceLoss::Sigmoid => "sigmoid",
            PreferenceLoss::Hinge => "hinge",
            PreferenceLoss::Ipo => "ipo",
            PreferenceLoss::Robust => "robust",
        }
    }
}

impl ObjectiveKind {
    pub fn name(self) -> &'static str {
        match self {
            ObjectiveKind::Sft => "sft",
            ObjectiveKind::Dpo => "dpo",
            ObjectiveKind::Simpo => "simpo",
        }
    }
}

impl ObjectiveSpec {
    pub fn is_sft(&self) -> bool {
        self.kind == ObjectiveKind::Sft
    }

    /// Whether training reads preference pairs.
    pub fn is_preference(&self) -> bool {
        !self.is_sft()
    }

    /// Whether the objective compares the policy with a reference model.
    pub fn needs_reference(&self) -> bool {
        self.kind == ObjectiveKind::Dpo
    }

    /// `beta`, or the method's default.
    pub fn beta(&self) -> f64 {
        self.beta.unwrap_or(match self.kind {
            ObjectiveKind::Simpo => 2.0,
            _ => 0.1,
        })
    }

    /// SimPO's margin γ, or its default.
    pub fn gamma(&self) -> f64 {
        self.gamma.unwrap_or(0.5)
    }

    /// What is wrong with these settings, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let kind = self.kind.name();
        if self.is_sft() {
            if *self != ObjectiveSpec::default() {
                problems.push(
                    "objective: beta, loss, label_smoothing, gamma, precompute_ref_log_probs and \
                     disable_dropout apply to the preference objectives (kind: dpo or simpo), not \
                     to sft"
                        .to_string(),
                );
            }
            return problems;
        }
        let beta = self.beta();
        if !(beta.is_finite() && beta > 0.0) {
            problems.push(format!(
                "objective.beta: must be a positive number, found {beta}"
            ));
        }
        let smoothing = self.label_smoothing;
        let smoothing_applies =
            self.kind == ObjectiveKind::Simpo || self.loss == PreferenceLoss::Robust;
        if smoothing != 0.0 && !smoothing_applies {
            problems.push(format!(
                "objective.label_smoothing: used by loss: robust (DPO) and by simpo, not by \
                 {kind} with loss: {} (as in TRL, whose sigmoid DPO has no smoothing)",
                self.loss.name()
            ));
        }
        if !(0.0..0.5).contains(&smoothing) {
            problems.push(format!(
                "objective.label_smoothing: must be in [0, 0.5), found {smoothing}"
            ));
        }
        if self.kind == ObjectiveKind::Simpo {
            if !self.loss.is_sigmoid() {
                problems.push(format!(
                    "objective.loss: {} is one of DPO's losses; simpo has its own",
                    self.loss.name()
                ));
            }
            if self.precompute_ref_log_probs {
                problems.push(
                    "objective.precompute_ref_log_probs: simpo uses no reference model".into(),
                );
            }
            let gamma = self.gamma();
            if !gamma.is_finite() {
                problems.push(format!("objective.gamma: must be a number, found {gamma}"));
            }
        } else if self.gamma.is_some() {
            problems.push("objective.gamma: SimPO's target margin; dpo has none".into());
        }
        problems
    }
}
