//! Rank allocation under a budget (`budget:F`): instead of one threshold for every layer, keep a
//! fixed total number of components over the whole model and give them to the layers whose
//! spectra need them most. The math only.
//!
//! Each group's spectrum is normalised (explained-variance ratios: the share of that layer's
//! energy each component holds), so layers are compared by the *relative* error a component
//! removes. All components of all groups are ranked by that share in one global list; the budget
//! takes them from the top, every group keeping at least one. Because each spectrum is
//! descending, taking a prefix of the global list keeps a prefix of every layer's spectrum.

/// Ranks per group for a total of `total` components: every group gets at least one (and at most
/// its full rank); the rest go to the largest normalised components across all groups (ties to the
/// lower group index, then the lower component index). `spectra[g]` is group `g`'s descending
/// explained-variance ratios.
#[cfg(test)]
pub fn allocate(spectra: &[Vec<f64>], total: usize) -> Vec<usize> {
    allocate_costed(spectra, &vec![1; spectra.len()], total)
}

/// [`allocate`] where a component of group `g` costs `costs[g]` cached values (a basis shared by
/// `G` layers is cached by each of them): components are taken by `spectra[g][i] / costs[g]`
/// while they fit in `total`.
pub fn allocate_costed(spectra: &[Vec<f64>], costs: &[usize], total: usize) -> Vec<usize> {
    let cost = |g: usize| costs.get(g).copied().unwrap_or(1).max(1);
    let mut ranks: Vec<usize> = spectra.iter().map(|s| usize::from(!s.is_empty())).collect();
    let mut kept: usize = ranks.iter().enumerate().map(|(g, &r)| r * cost(g)).sum();
    let mut candidates: Vec<(f64, usize, usize)> = spectra
        .iter()
        .enumerate()
        .flat_map(|(g, s)| {
            let c = cost(g) as f64;
            s.iter()
                .enumerate()
                .skip(1)
                .map(move |(i, &r)| (r / c, g, i))
        })
        .collect();
    candidates.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| a.1.cmp(&b.1))
            .then_with(|| a.2.cmp(&b.2))
    });
    for (_, g, i) in candidates {
        if kept >= total {
            break;
        }
        // Spectra are descending, so component i of group g comes after 0..i of the same group
        // (equal values keep index order); taking it extends that group's prefix by one.
        if ranks[g] == i && kept + cost(g) <= total {
            ranks[g] += 1;
            kept += cost(g);
        }
    }
    ranks
}

/// The number of components `budget:fraction` keeps over groups whose output widths (the values
/// each would cache per token, or the rows of each matrix) are `widths`, after `extra_per_group`
/// fixed latent directions per group (the mean direction of fit `pca`) are paid for.
pub fn total_components(widths: &[usize], fraction: f64, extra_per_group: usize) -> usize {
    let total_width: usize = widths.iter().sum();
    let target = (fraction * total_width as f64).round() as usize;
    target.saturating_sub(extra_per_group * widths.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_ranking_golden_values() {
        let spectra = vec![
            vec![0.5, 0.3, 0.15, 0.05],
            vec![0.9, 0.05, 0.03, 0.02],
            vec![0.4, 0.35, 0.2, 0.05],
        ];
        // Minimum one each (3), then 0.35, 0.3, 0.2, 0.15 in order.
        assert_eq!(allocate(&spectra, 3), vec![1, 1, 1]);
        assert_eq!(allocate(&spectra, 4), vec![1, 1, 2]);
        assert_eq!(allocate(&spectra, 5), vec![2, 1, 2]);
        assert_eq!(allocate(&spectra, 6), vec![2, 1, 3]);
        assert_eq!(allocate(&spectra, 7), vec![3, 1, 3]);
        assert_eq!(allocate(&spectra, 12), vec![4, 4, 4]);
        assert_eq!(allocate(&spectra, 99), vec![4, 4, 4]);
        assert_eq!(allocate(&spectra, 0), vec![1, 1, 1]);
    }

    #[test]
    fn totals_are_hit_exactly_when_reachable() {
        let spectra: Vec<Vec<f64>> = (0..7)
            .map(|g| {
                let raw: Vec<f64> = (0..20)
                    .map(|i| (-(i as f64) / (2.0 + g as f64)).exp())
                    .collect();
                let sum: f64 = raw.iter().sum();
                raw.iter().map(|r| r / sum).collect()
            })
            .collect();
        for total in 7..=140 {
            let ranks = allocate(&spectra, total);
            assert_eq!(ranks.iter().sum::<usize>(), total);
            assert!(ranks.iter().all(|&r| (1..=20).contains(&r)));
        }
    }

    #[test]
    fn costed_allocation_pays_per_cached_value() {
        let spectra = vec![vec![0.5, 0.3, 0.2], vec![0.5, 0.3, 0.2]];
        // Group 1 is a basis shared by 2 layers: its components cost 2 and rank at half value.
        assert_eq!(allocate_costed(&spectra, &[1, 2], 3), vec![1, 1]);
        assert_eq!(allocate_costed(&spectra, &[1, 2], 4), vec![2, 1]);
        assert_eq!(allocate_costed(&spectra, &[1, 2], 7), vec![3, 2]);
        assert_eq!(allocate_costed(&spectra, &[1, 1], 4), allocate(&spectra, 4));
    }

    #[test]
    fn budget_totals() {
        assert_eq!(total_components(&[384; 30], 0.5, 0), 5760);
        assert_eq!(total_components(&[384; 30], 0.5, 1), 5730);
        assert_eq!(total_components(&[10], 0.01, 1), 0);
    }
}
