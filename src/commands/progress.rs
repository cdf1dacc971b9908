//! The calibration stage's passes drawn on stderr: one bar per pass, named, with the layer, the
//! tokens per second so far and the time left (hidden with `--quiet`, `--json`, or when stderr is
//! not a terminal).

use crate::calibrate::progress::Progress;
use indicatif::ProgressBar;
use std::sync::Mutex;
use std::time::Instant;

/// The bar of a calibration pass.
const PASS_BAR: &str = "calibration, {prefix}: layer {pos}/{len} {wide_bar} {msg} eta {eta}";

/// The pass now running.
struct Running {
    bar: ProgressBar,
    started: Instant,
    tokens: usize,
    layers: usize,
    done: usize,
}

/// Draws the stage's passes (nothing when `show` is false).
pub(crate) struct PassBars {
    show: bool,
    running: Mutex<Option<Running>>,
}

impl PassBars {
    /// Bars shown when `show` (and stderr is a terminal).
    pub(crate) fn new(show: bool) -> Self {
        PassBars {
            show,
            running: Mutex::new(None),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Option<Running>)) {
        // A panic while drawing cannot leave the bar half-updated in a way that matters.
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut running);
    }
}

/// Tokens per second of a pass that crossed `done` of `layers` layers over `tokens` positions in
/// `seconds`: the positions a whole pass would have moved at this pace.
fn tokens_per_second(tokens: usize, (done, layers): (usize, usize), seconds: f64) -> f64 {
    if layers == 0 || seconds <= 0.0 {
        return 0.0;
    }
    tokens as f64 * done as f64 / layers as f64 / seconds
}

impl Progress for PassBars {
    fn start(&self, pass: &'static str, layers: usize, tokens: usize) {
        let bar = super::progress_bar(self.show, layers as u64, PASS_BAR);
        bar.set_prefix(pass);
        self.with(|running| {
            if let Some(old) = running.take() {
                old.bar.finish_and_clear();
            }
            *running = Some(Running {
                bar,
                started: Instant::now(),
                tokens,
                layers,
                done: 0,
            });
        });
    }

    fn layer(&self) {
        self.with(|running| {
            if let Some(r) = running {
                r.done += 1;
                let rate = tokens_per_second(
                    r.tokens,
                    (r.done, r.layers),
                    r.started.elapsed().as_secs_f64(),
                );
                r.bar.set_message(format!("{rate:.0} tokens/s"));
                r.bar.inc(1);
            }
        });
    }

    fn finish(&self) {
        self.with(|running| {
            if let Some(r) = running.take() {
                r.bar.finish_and_clear();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_per_second_counts_a_whole_pass_worth() {
        assert_eq!(tokens_per_second(1000, (5, 10), 2.0), 250.0);
        assert_eq!(tokens_per_second(1000, (10, 10), 2.0), 500.0);
        assert_eq!(tokens_per_second(1000, (0, 0), 2.0), 0.0);
        assert_eq!(tokens_per_second(1000, (1, 10), 0.0), 0.0);
    }

    #[test]
    fn a_hidden_bar_takes_every_call() {
        let bars = PassBars::new(false);
        bars.start("one-shot pass", 3, 100);
        bars.layer();
        bars.start("o_proj refit", 2, 100);
        bars.layer();
        bars.finish();
        bars.layer();
        bars.finish();
        assert!(bars.running.lock().unwrap().is_none());
    }
}
