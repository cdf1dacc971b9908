//! Property tests for the math and the SPEC grammar.

use faer::Mat;
use proptest::prelude::*;
use surgery_convert::fit::decompose::{
    choose_rank, decompose, matrix_to_rows, rank_for_threshold, relative_error, Fit,
};
use surgery_convert::fit::spec::Spec;

fn spectrum() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(0.0f64..10.0, 1..40).prop_map(|mut v| {
        v.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let total: f64 = v.iter().sum();
        if total == 0.0 {
            vec![1.0 / v.len() as f64; v.len()]
        } else {
            v.iter().map(|x| x / total).collect()
        }
    })
}

proptest! {
    #[test]
    fn rank_is_the_smallest_count_reaching_the_threshold(ratios in spectrum(), t in 0.0001f64..0.9999) {
        let r = rank_for_threshold(&ratios, t);
        prop_assert!(r >= 1 && r <= ratios.len());
        let cum = |k: usize| ratios[..k].iter().sum::<f64>();
        // Either the threshold is reached at r and not before, or it is never reached (rounding).
        if cum(ratios.len()) >= t {
            prop_assert!(cum(r) >= t - 1e-12);
            prop_assert!(r == 1 || cum(r - 1) < t + 1e-12);
        } else {
            prop_assert_eq!(r, ratios.len());
        }
    }

    #[test]
    fn higher_thresholds_never_keep_fewer_components(ratios in spectrum(), a in 0.0001f64..1.0, b in 0.0001f64..1.0) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(rank_for_threshold(&ratios, lo) <= rank_for_threshold(&ratios, hi));
    }

    #[test]
    fn fixed_rank_is_clamped(ratios in spectrum(), n in 1usize..100) {
        let c = choose_rank(&ratios, Spec::Rank(n));
        prop_assert_eq!(c.rank, n.min(ratios.len()));
        prop_assert_eq!(c.clamped, n > ratios.len());
    }

    #[test]
    fn spec_display_round_trips(t in 0.0001f64..=1.0, n in 1usize..1_000_000) {
        for spec in [Spec::Threshold(t), Spec::Rank(n)] {
            prop_assert_eq!(spec.to_string().parse::<Spec>().unwrap(), spec);
        }
    }

    #[test]
    fn svd_error_is_the_discarded_energy(
        m in 2usize..12, n in 2usize..12, r in 1usize..12,
        values in prop::collection::vec(-1.0f64..1.0, 144),
    ) {
        let w = Mat::from_fn(m, n, |i, j| values[i * 12 + j]);
        let d = decompose(w.as_ref(), Fit::Svd, Spec::Rank(r)).unwrap();
        let err = relative_error(&matrix_to_rows(w.as_ref()), &matrix_to_rows(d.reconstruction.as_ref()));
        prop_assert!((err * err - (1.0 - d.variance_kept)).abs() < 1e-9);
        // More components never fit worse.
        if r > 1 {
            let d2 = decompose(w.as_ref(), Fit::Svd, Spec::Rank(r - 1)).unwrap();
            prop_assert!(d2.variance_kept <= d.variance_kept + 1e-12);
        }
    }

    #[test]
    fn pca_and_seed_differ_exactly_by_the_mean(
        m in 2usize..10, n in 2usize..10, t in 0.05f64..1.0,
        values in prop::collection::vec(-1.0f64..1.0, 100),
    ) {
        let w = Mat::from_fn(m, n, |i, j| values[i * 10 + j]);
        let pca = decompose(w.as_ref(), Fit::Pca, Spec::Threshold(t)).unwrap();
        let seed = decompose(w.as_ref(), Fit::Seed, Spec::Threshold(t)).unwrap();
        prop_assert_eq!(pca.choice, seed.choice);
        for j in 0..n {
            let mean = (0..m).map(|i| w[(i, j)]).sum::<f64>() / m as f64;
            for i in 0..m {
                prop_assert!((pca.reconstruction[(i, j)] - seed.reconstruction[(i, j)] - mean).abs() < 1e-10);
            }
        }
    }
}

proptest! {
    /// Whatever the text, parsing a SPEC never panics, and what it accepts is in range.
    #[test]
    fn spec_parsing_accepts_only_valid_values(s in ".{0,24}") {
        match s.parse::<Spec>() {
            Ok(Spec::Threshold(t)) => prop_assert!(t.is_finite() && t > 0.0 && t <= 1.0),
            Ok(Spec::Rank(n)) => prop_assert!(n >= 1),
            Ok(Spec::Budget(f)) => prop_assert!(f.is_finite() && f > 0.0 && f <= 1.0),
            Err(message) => prop_assert!(!message.is_empty()),
        }
    }

    /// Structured near-misses: the grammar's prefixes with arbitrary numbers.
    #[test]
    fn spec_numbers_are_range_checked(x in prop_oneof![
        any::<f64>(),
        -2.0f64..2.0,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(1.0),
    ]) {
        let in_range = x.is_finite() && x > 0.0 && x <= 1.0;
        prop_assert_eq!(format!("{x}").parse::<Spec>().is_ok(), in_range);
        prop_assert_eq!(format!("budget:{x}").parse::<Spec>().is_ok(), in_range);
    }

    #[test]
    fn rank_specs_need_a_positive_whole_number(n in any::<i64>()) {
        let parsed = format!("rank:{n}").parse::<Spec>();
        if n >= 1 {
            prop_assert_eq!(parsed, Ok(Spec::Rank(n as usize)));
        } else {
            prop_assert!(parsed.is_err());
        }
    }

    /// The rank rule at its edges: a threshold of 1 keeps everything, one at or below the first
    /// ratio keeps one component, and choose_rank agrees with rank_for_threshold.
    #[test]
    fn rank_rule_edges(ratios in spectrum(), t in 0.0001f64..=1.0) {
        prop_assert_eq!(rank_for_threshold(&ratios, 1.0), ratios.len());
        prop_assert_eq!(rank_for_threshold(&ratios, ratios[0]), 1);
        let c = choose_rank(&ratios, Spec::Threshold(t));
        prop_assert_eq!(c.rank, rank_for_threshold(&ratios, t));
        prop_assert!(!c.clamped);
        prop_assert_eq!(c.full_rank, ratios.len());
    }
}
