//! `sweep.json`: what was swept, on what, and per configuration the ranks, the K/V cache and
//! parameter figures of the factored form (as `surgery.json` computes them) and the perplexity.
//! Everything but the `seconds` fields is deterministic.

use crate::commands::sweep::evaluate::Evaluation;
use crate::execute::CalibrationRecord;
use crate::execute::GroupReport;
use crate::input::source::InputIdentity;
use crate::model::bos::BosToken;
use crate::options::SweepConfig;
use crate::report::{kv_values_per_token, BeforeAfter, ModelRecord, Tool};
use serde::Serialize;
use std::collections::BTreeMap;

/// `sweep.json`.
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Tool name and version.
    pub tool: Tool,
    /// The command that reproduces the sweep (add `--out DIR`).
    pub command: String,
    /// The model swept.
    pub model: SweepModel,
    /// The text scored.
    pub text: TextRecord,
    /// The calibration of the `act` fits, when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
    /// The unmodified model.
    pub base: BaseRecord,
    /// One entry per configuration, in sweep order.
    pub configs: Vec<ConfigRecord>,
    /// Wall time of the whole sweep (loading, calibration, every evaluation), seconds.
    pub seconds: f64,
}

/// The model swept.
#[derive(Debug, Clone, Serialize)]
pub struct SweepModel {
    /// Local path or hub repo.
    #[serde(flatten)]
    pub identity: InputIdentity,
    /// `architectures[0]`.
    pub architecture: String,
    /// Its shape.
    #[serde(flatten)]
    pub shape: ModelRecord,
}

/// The text scored, with `eval`'s convention.
#[derive(Debug, Clone, Serialize)]
pub struct TextRecord {
    /// `--text` as given.
    pub file: String,
    /// SHA-256 of its bytes.
    pub sha256: String,
    /// `--offset`, in tokens.
    pub offset: usize,
    /// Next-token predictions scored: `windows * (ctx - 1)`.
    pub tokens: usize,
    /// `--ctx`.
    pub ctx: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// The token every window starts with (`null`: none).
    pub bos: Option<BosToken>,
    /// Text tokens scored that are the tokenizer's unknown token.
    pub unknown_tokens: usize,
}

/// The unmodified model's score.
#[derive(Debug, Clone, Serialize)]
pub struct BaseRecord {
    /// `exp(nll_mean)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll_mean: f64,
    /// K+V values cached per token over all layers.
    pub kv_cache_values_per_token: u64,
    /// Wall time of its evaluation, seconds.
    pub seconds: f64,
}

/// Ranks of one group kind across layers.
#[derive(Debug, Clone, Serialize)]
pub struct RankRecord {
    /// Components kept, per layer.
    pub per_layer: Vec<usize>,
    /// The smallest.
    pub min: usize,
    /// Their mean.
    pub mean: f64,
    /// The largest.
    pub max: usize,
    /// Mean explained variance kept.
    pub mean_variance_kept: f64,
}

/// One configuration's result.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigRecord {
    /// The conversion options, as on the command line.
    pub label: String,
    /// `--shared-kv` SPEC.
    pub shared_kv: Option<String>,
    /// `--q` SPEC.
    pub q: Option<String>,
    /// The fit.
    pub fit: &'static str,
    /// Per group kind (`q`, `shared_kv`), the ranks.
    pub ranks: BTreeMap<&'static str, RankRecord>,
    /// K+V values per token over all layers, original vs factored form.
    pub kv_cache_values_per_token: BeforeAfter,
    /// Parameters of the decomposed matrices, original vs factored form.
    pub params: BeforeAfter,
    /// `exp(nll_mean)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll_mean: f64,
    /// `perplexity / base perplexity`.
    pub ratio_to_base: f64,
    /// Wall time of this configuration (fits and forward pass), seconds.
    pub seconds: f64,
}

/// `exp` of the mean NLL of `nll` over `count` predictions, and that mean.
pub fn perplexity(nll: f64, count: usize) -> (f64, f64) {
    let mean = nll / count.max(1) as f64;
    (mean.exp(), mean)
}

/// K+V values per token over `num_layers` layers in the factored form of `reports`.
pub fn kv_cache(reports: &[GroupReport], num_layers: usize, kv_dim: u64) -> BeforeAfter {
    let after = (0..num_layers)
        .map(|layer| kv_values_per_token(reports, layer, kv_dim))
        .sum();
    BeforeAfter {
        before: 2 * kv_dim * num_layers as u64,
        after,
    }
}

/// The ranks of each group kind in `reports`.
pub fn ranks(reports: &[GroupReport]) -> BTreeMap<&'static str, RankRecord> {
    let mut kinds: Vec<&'static str> = reports.iter().map(|g| g.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds
        .into_iter()
        .map(|kind| {
            let of_kind: Vec<&GroupReport> = reports.iter().filter(|g| g.kind == kind).collect();
            let per_layer: Vec<usize> = of_kind.iter().map(|g| g.rank).collect();
            let n = per_layer.len().max(1) as f64;
            let record = RankRecord {
                min: per_layer.iter().copied().min().unwrap_or(0),
                max: per_layer.iter().copied().max().unwrap_or(0),
                mean: per_layer.iter().sum::<usize>() as f64 / n,
                mean_variance_kept: of_kind.iter().map(|g| g.variance_kept).sum::<f64>() / n,
                per_layer,
            };
            (kind, record)
        })
        .collect()
}

/// The record of `config` evaluated as `evaluation`.
pub fn config_record(
    config: &SweepConfig,
    evaluation: &Evaluation,
    num_layers: usize,
    kv_dim: u64,
    base_perplexity: f64,
    seconds: f64,
) -> ConfigRecord {
    let reports = &evaluation.reports;
    let (ppl, nll_mean) = perplexity(evaluation.nll, evaluation.count);
    ConfigRecord {
        label: config.label(),
        shared_kv: config.shared_kv.map(|s| s.to_string()),
        q: config.q.map(|s| s.to_string()),
        fit: config.fit.name(),
        ranks: ranks(reports),
        kv_cache_values_per_token: kv_cache(reports, num_layers, kv_dim),
        params: BeforeAfter {
            before: reports.iter().map(|g| g.params_original).sum(),
            after: reports.iter().map(|g| g.params_factored).sum(),
        },
        perplexity: ppl,
        nll_mean,
        ratio_to_base: ppl / base_perplexity,
        seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(layer: usize, kind: &'static str, rank: usize, latent: usize) -> GroupReport {
        GroupReport {
            layer,
            layers: Vec::new(),
            share: None,
            kind,
            tensors: Vec::new(),
            shape: [64, 64],
            spec: "0.5".into(),
            fit: "pca",
            rank,
            latent,
            full_rank: 64,
            rank_clamped: false,
            variance_kept: 0.5,
            relative_error: 0.1,
            tensor_relative_errors: Vec::new(),
            params_original: 100,
            params_factored: 10 * latent as u64,
            bytes_original: 400,
            bytes_factored: 40,
            layer_energy_kept: Vec::new(),
            seconds: 0.0,
        }
    }

    #[test]
    fn kv_cache_and_ranks_follow_the_reports() {
        // Layer 0: shared latent 5; layer 1: q only, so K and V are cached in full (2 * 32).
        let reports = vec![
            group(0, "q", 7, 8),
            group(0, "shared_kv", 4, 5),
            group(1, "q", 3, 4),
        ];
        let kv = kv_cache(&reports, 2, 32);
        assert_eq!((kv.before, kv.after), (128, 5 + 64));
        // One latent of width 6 for layers 0-2 is cached once; a basis of width 6 once per layer.
        let mut shared = group(0, "shared_kv", 5, 6);
        shared.layers = vec![0, 1, 2];
        shared.share = Some("latent");
        assert_eq!(kv_cache(&[shared.clone()], 3, 32).after, 6);
        shared.share = Some("basis");
        assert_eq!(kv_cache(&[shared], 3, 32).after, 18);
        let r = ranks(&reports);
        assert_eq!(r.keys().copied().collect::<Vec<_>>(), ["q", "shared_kv"]);
        assert_eq!(r["q"].per_layer, [7, 3]);
        assert_eq!((r["q"].min, r["q"].max, r["q"].mean), (3, 7, 5.0));
        assert_eq!(r["shared_kv"].per_layer, [4]);
        let (ppl, mean) = perplexity(10.0, 4);
        assert_eq!(mean, 2.5);
        assert!((ppl - 2.5f64.exp()).abs() < 1e-12);
    }
}
