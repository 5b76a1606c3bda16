//! Preference pairs measured: DPO's losses (TRL's `sigmoid`, `hinge`, `ipo`, `robust`) against a
//! reference and the reference-free SimPO, each pair's loss, its derivative with respect to the
//! two log-probabilities and TRL's metrics (`rewards/chosen`, `rewards/rejected`,
//! `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`); what training
//! minimises (see [`crate::train::preference`]) and what `kiln eval --task preference` reports.

use anyhow::Result;

use crate::data::{PreferencePair, Sequence};
use crate::model::Model;
use crate::recipe::{ObjectiveKind, ObjectiveSpec, PreferenceLoss};

/// The metrics a preference objective logs, with TRL's names, in the order [`PairTotals`] sums
/// them (after the loss).
pub const METRICS: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

/// How many sums a batch of pairs gives: the loss and each of [`METRICS`].
pub const TOTALS: usize = 1 + METRICS.len();

/// Sums over pairs: the loss, then each of [`METRICS`].
pub type PairTotals = [f64; TOTALS];

/// A preference objective's formula: the pair's loss, its derivative with respect to the two
/// log-probabilities, and its rewards.
#[derive(Debug, Clone, Copy)]
pub struct PairLoss {
    kind: ObjectiveKind,
    loss: PreferenceLoss,
    pub beta: f64,
    label_smoothing: f64,
    gamma: f64,
}

/// What a pair's sequences give: per sequence, the sum of its completion tokens'
/// log-probabilities and how many tokens that is.
#[derive(Debug, Clone, Copy)]
pub struct PairLogps {
    pub policy: [f64; 2],
    /// The reference's; unused by SimPO.
    pub reference: [f64; 2],
    /// Completion tokens per sequence (TRL's `completion_mask.sum`, what IPO divides by).
    pub completion: [f64; 2],
    /// Completion tokens that are predicted (SimPO's average is over these).
    pub predicted: [f64; 2],
}

/// One pair's loss, gradient and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairTerms {
    pub loss: f64,
    /// `∂loss/∂logp` of the chosen and the rejected sequence.
    pub grad: [f64; 2],
    pub rewards: [f64; 2],
    /// The log-probabilities reported as `logps/*` (SimPO: per token, as TRL's CPO reports).
    pub logps: [f64; 2],
}

fn log_sigmoid(x: f64) -> f64 {
    match x >= 0.0 {
        true => -(-x).exp().ln_1p(),
        false => x - x.exp().ln_1p(),
    }
}

fn sigmoid(x: f64) -> f64 {
    match x >= 0.0 {
        true => 1.0 / (1.0 + (-x).exp()),
        false => {
            let e = x.exp();
            e / (1.0 + e)
        }
    }
}

impl PairLoss {
    pub fn new(spec: &ObjectiveSpec) -> Self {
        Self {
            kind: spec.kind,
            loss: spec.loss,
            beta: spec.beta(),
            label_smoothing: spec.label_smoothing,
            gamma: spec.gamma(),
        }
    }

    /// The pair's terms from its log-probabilities.
    pub fn terms(&self, logps: &PairLogps) -> PairTerms {
        let (beta, eps) = (self.beta, self.label_smoothing);
        let [c, r] = logps.policy;
        if self.kind == ObjectiveKind::Simpo {
            let [mc, mr] = logps.predicted.map(|n| n.max(1.0));
            let (avg_c, avg_r) = (c / mc, r / mr);
            let u = beta * (avg_c - avg_r) - self.gamma;
            let loss = -(1.0 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u);
            let d_u = -(1.0 - eps) * sigmoid(-u) + eps * sigmoid(u);
            return PairTerms {
                loss,
                grad: [d_u * beta / mc, -d_u * beta / mr],
                rewards: [beta * avg_c, beta * avg_r],
                logps: [avg_c, avg_r],
            };
        }
        let [rc, rr] = logps.reference;
        let (chosen_ratio, rejected_ratio) = (c - rc, r - rr);
        let delta = chosen_ratio - rejected_ratio;
        let (loss, grad) = match self.loss {
            PreferenceLoss::Sigmoid => {
                let d = -beta * sigmoid(-beta * delta);
                (-log_sigmoid(beta * delta), [d, -d])
            }
            PreferenceLoss::Hinge => {
                let margin = 1.0 - beta * delta;
                let d = if margin > 0.0 { -beta } else { 0.0 };
                (margin.max(0.0), [d, -d])
            }
            PreferenceLoss::Robust => {
                let norm = 1.0 - 2.0 * eps;
                let loss = (-(1.0 - eps) * log_sigmoid(beta * delta)
                    + eps * log_sigmoid(-beta * delta))
                    / norm;
                let d = (-(1.0 - eps) * beta * sigmoid(-beta * delta)
                    - eps * beta * sigmoid(beta * delta))
                    / norm;
                (loss, [d, -d])
            }
            PreferenceLoss::Ipo => {
                let [nc, nr] = logps.completion.map(|n| n.max(1.0));
                let gap = chosen_ratio / nc - rejected_ratio / nr - 1.0 / (2.0 * beta);
                (gap * gap, [2.0 * gap / nc, -2.0 * gap / nr])
            }
        };
        PairTerms {
            loss,
            grad,
            rewards: [beta * chosen_ratio, beta * rejected_ratio],
            logps: [c, r],
        }
    }

    /// Whether the loss compares with a reference.
    pub fn needs_reference(&self) -> bool {
        self.kind == ObjectiveKind::Dpo
    }

    /// As reports name it: `dpo (sigmoid)`, `simpo`.
    pub fn name(&self) -> String {
        match self.kind {
            ObjectiveKind::Dpo => format!("dpo ({})", self.loss.name()),
            kind => kind.name().to_string(),
        }
    }
}

impl PairTerms {
    /// This pair's share of [`PairTotals`].
    pub fn add_to(&self, totals: &mut PairTotals) {
        let [rc, rr] = self.rewards;
        let values = [
            self.loss,
            rc,
            rr,
            f64::from(u8::from(rc > rr)),
            rc - rr,
            self.logps[0],
            self.logps[1],
        ];
        for (total, value) in totals.iter_mut().zip(values) {
            *total += value;
        }
    }
}

/// A pair's two sequences as batch rows, chosen then rejected: interleaved so that each row's
/// place in the global batch (what its dropout is drawn from) is fixed by its pair's.
pub fn rows_of<'p>(pairs: impl IntoIterator<Item = &'p PreferencePair>) -> Vec<Sequence> {
    pairs
        .into_iter()
        .flat_map(|p| [p.chosen.clone(), p.rejected.clone()])
        .collect()
}

/// Each row's log-probability: minus the sum of its labelled positions' cross-entropies
/// (`label_nll`, in row order, `counts[i]` for row `i`).
pub fn row_logps(label_nll: &[f64], counts: &[usize]) -> Vec<f64> {
    let mut at = 0;
    counts
        .iter()
        .map(|&n| {
            let logp = -label_nll[at..at + n].iter().sum::<f64>();
            at += n;
            logp
        })
        .collect()
}

/// The model a preference objective's rewards are measured against.
#[derive(Clone, Copy)]
pub struct ReferenceModel<'m> {
    pub model: &'m Model,
    /// The model with its LoRA adapters off: its base (a LoRA run's reference).
    pub adapters_off: bool,
}

impl<'m> ReferenceModel<'m> {
    /// `model` as it is.
    pub fn whole(model: &'m Model) -> Self {
        Self {
            model,
            adapters_off: false,
        }
    }
}

/// The log-probabilities of `rows` under `model`, no gradients.
pub fn sequence_logps(model: ReferenceModel, rows: &[Sequence], pad_id: u32) -> Result<Vec<f64>> {
    let ReferenceModel {
        model,
        adapters_off,
    } = model;
    let (mut batch, labels) = crate::data::batch_of(rows, pad_id, model.device())?;
    batch.adapters_off = adapters_off;
    let counts: Vec<usize> = rows.iter().map(Sequence::target_count).collect();
    Ok(row_logps(&model.label_nll(&batch, &labels)?, &counts))
}

/// Each pair's [`PairLogps`], the policy's given per row.
pub fn pair_logps(
    pairs: &[PreferencePair],
    policy: &[f64],
    reference: &[Option<[f64; 2]>],
) -> Vec<PairLogps> {
    let count = |s: &Sequence| s.loss_mask.iter().filter(|&&m| m).count() as f64;
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| PairLogps {
            policy: [policy[2 * i], policy[2 * i + 1]],
            reference: reference[i].unwrap_or([0.0; 2]),
            completion: [count(&p.chosen), count(&p.rejected)],
            predicted: [
                p.chosen.target_count() as f64,
                p.rejected.target_count() as f64,
            ],
        })
        .collect()
}

/// The reference's log-probabilities of each pair whose sequences are `rows` (see
/// [`rows_of`]): from `model`, else as the pairs carry them; `None` each for an objective
/// without a reference.
pub fn reference_logps(
    objective: &PairLoss,
    pairs: &[PreferencePair],
    rows: &[Sequence],
    model: Option<ReferenceModel>,
    pad_id: u32,
) -> Result<Vec<Option<[f64; 2]>>> {
    if !objective.needs_reference() {
        return Ok(vec![None; pairs.len()]);
    }
    if let Some(model) = model {
        let logps = sequence_logps(model, rows, pad_id)?;
        return Ok((0..pairs.len())
            .map(|i| Some([logps[2 * i], logps[2 * i + 1]]))
            .collect());
    }
    anyhow::ensure!(
        pairs.iter().all(|p| p.reference.is_some()),
        "the pairs carry no reference log-probabilities and no reference model runs"
    );
    Ok(pairs.iter().map(|p| p.reference).collect())
}

/// The objective's loss and metrics over `pairs` (`batch_size` pairs at a time), no gradients:
/// `loss` and [`METRICS`], means over the pairs.
pub fn evaluate(
    objective: &PairLoss,
    model: &Model,
    reference: Option<ReferenceModel>,
    pairs: &[PreferencePair],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<(String, f64)>> {
    let mut totals: PairTotals = [0.0; TOTALS];
    for chunk in pairs.chunks(batch_size.max(1)) {
        let rows = rows_of(chunk);
        let policy = sequence_logps(ReferenceModel::whole(model), &rows, pad_id)?;
        let reference = reference_logps(objective, chunk, &rows, reference, pad_id)?;
        for logps in pair_logps(chunk, &policy, &reference) {
            objective.terms(&logps).add_to(&mut totals);
        }
    }
    Ok(means(&totals, pairs.len()))
}

/// `loss` and [`METRICS`] from their sums over `pairs` pairs.
pub fn means(totals: &PairTotals, pairs: usize) -> Vec<(String, f64)> {
    let n = pairs.max(1) as f64;
    std::iter::once("loss")
        .chain(METRICS)
        .zip(totals)
        .map(|(name, total)| (name.to_string(), total / n))
        .collect()
}

/// `kiln eval --task preference`: how often the model prefers the chosen completion, by the
/// objective's implicit reward, over held-out pairs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PreferenceReport {
    pub task: &'static str,
    pub model: String,
    pub model_sha256: String,
    /// What the rewards are measured against: a reference model, or none.
    pub reference: String,
    pub objective: String,
    pub beta: f64,
    pub split: String,
    pub n: usize,
    /// `rewards/accuracies`: the share of pairs whose chosen completion gets the higher reward.
    pub accuracy: f64,
    pub loss: f64,
    /// TRL's metrics, means over the pairs.
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub date: String,
}

impl PreferenceReport {
    /// The report of `evaluate`'s results.
    pub fn new(results: &[(String, f64)], objective: &PairLoss, n: usize) -> Self {
        let value = |name: &str| {
            results
                .iter()
                .find(|(n, _)| n == name)
                .map_or(f64::NAN, |(_, v)| *v)
        };
        Self {
            task: "preference",
            model: String::new(),
            model_sha256: String::new(),
            reference: String::new(),
            objective: objective.name(),
            beta: objective.beta,
            split: String::new(),
            n,
            accuracy: value("rewards/accuracies"),
            loss: value("loss"),
            metrics: results.iter().cloned().collect(),
            date: super::report::utc_now(),
        }
    }
}

/// `report.json` and `report.md` into `dir`.
pub fn write_report(
    dir: &std::path::Path,
    report: &PreferenceReport,
) -> Result<Vec<std::path::PathBuf>> {
    let mut md = format!(
        "# Evaluation: preference\n\n| | |\n|---|---|\n| model | `{}` |\n| weights sha256 | `{}` |\n\
         | reference | {} |\n| objective | {} (beta {}) |\n| split | {} |\n| pairs | {} |\n\
         | accuracy (rewards/accuracies) | {:.4} |\n| loss | {:.6} |\n",
        report.model,
        report.model_sha256,
        report.reference,
        report.objective,
        report.beta,
        super::report::md_cell(&report.split),
        report.n,
        report.accuracy,
        report.loss,
    );
    for (name, value) in &report.metrics {
        if name != "loss" && name != "rewards/accuracies" {
            md.push_str(&format!("| {name} | {value:.6} |\n"));
        }
    }
    md.push_str(&format!("| date | {} |\n", report.date));
    let files = [
        ("report.json", serde_json::to_string_pretty(report)? + "\n"),
        ("report.md", md),
    ];
    super::report::write_files(dir, &files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logps(policy: [f64; 2], reference: [f64; 2]) -> PairLogps {
        PairLogps {
            policy,
            reference,
            completion: [5.0, 7.0],
            predicted: [4.0, 7.0],
        }
    }

    fn spec(kind: ObjectiveKind, loss: PreferenceLoss, smoothing: f64) -> ObjectiveSpec {
        ObjectiveSpec {
            kind,
            beta: Some(0.3),
            loss,
            label_smoothing: smoothing,
            gamma: (kind == ObjectiveKind::Simpo).then_some(0.4),
            precompute_ref_log_probs: false,
            disable_dropout: true,
        }
    }

    /// Every loss's derivative against central differences of its own value.
    #[test]
    fn pair_gradients_match_finite_differences() {
        let cases = [
            spec(ObjectiveKind::Dpo, PreferenceLoss::Sigmoid, 0.0),
            spec(ObjectiveKind::Dpo, PreferenceLoss::Hinge, 0.0),
            spec(ObjectiveKind::Dpo, PreferenceLoss::Ipo, 0.0),
            spec(ObjectiveKind::Dpo, PreferenceLoss::Robust, 0.1),
            spec(ObjectiveKind::Simpo, PreferenceLoss::Sigmoid, 0.0),
            spec(ObjectiveKind::Simpo, PreferenceLoss::Sigmoid, 0.2),
        ];
        for spec in cases {
            let pair = PairLoss::new(&spec);
            for (policy, reference) in [
                ([-12.0, -15.5], [-13.0, -14.0]),
                ([-30.0, -8.0], [-29.0, -9.5]),
                ([-2.0, -40.0], [-2.5, -35.0]),
            ] {
                let at = logps(policy, reference);
                let terms = pair.terms(&at);
                for side in 0..2 {
                    let h = 1e-5;
                    let mut up = at;
                    up.policy[side] += h;
                    let mut down = at;
                    down.policy[side] -= h;
                    let numeric = (pair.terms(&up).loss - pair.terms(&down).loss) / (2.0 * h);
                    assert!(
                        (numeric - terms.grad[side]).abs() < 1e-6 * numeric.abs().max(1.0),
                        "{spec:?} {policy:?}: side {side}: {} vs {numeric}",
                        terms.grad[side]
                    );
                }
            }
        }
    }

    #[test]
    fn dpo_sigmoid_is_its_formula_with_trl_rewards() {
        let pair = PairLoss::new(&spec(ObjectiveKind::Dpo, PreferenceLoss::Sigmoid, 0.0));
        let terms = pair.terms(&logps([-10.0, -12.0], [-11.0, -11.0]));
        // margin (−10 − −11) − (−12 − −11) = 2; loss −log σ(0.3 × 2).
        let expected = (1.0 + (-0.6f64).exp()).ln();
        assert!((terms.loss - expected).abs() < 1e-12);
        assert_eq!(terms.rewards, [0.3, -0.3]);
        assert_eq!(terms.logps, [-10.0, -12.0]);
        // SimPO: β × (mean logp) − γ, with per-token logps reported.
        let simpo = PairLoss::new(&spec(ObjectiveKind::Simpo, PreferenceLoss::Sigmoid, 0.0));
        let terms = simpo.terms(&logps([-8.0, -14.0], [0.0, 0.0]));
        let u = 0.3 * (-8.0 / 4.0 - -14.0 / 7.0) - 0.4;
        assert!((terms.loss + log_sigmoid(u)).abs() < 1e-12);
        assert_eq!(terms.logps, [-2.0, -2.0]);
    }

    #[test]
    fn log_sigmoid_is_stable_far_out() {
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-300);
        assert!((sigmoid(-800.0)).abs() < 1e-300 && (sigmoid(800.0) - 1.0).abs() < 1e-15);
    }
}
