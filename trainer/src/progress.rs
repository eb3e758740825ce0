//! Progress reporting for the long steps: a bar on a terminal, log lines otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Log lines written over a step when stderr is not a terminal.
const LOG_STEPS: u64 = 10;

/// Creates a bar of `len` steps labelled `label`, hidden when stderr is not a terminal.
pub fn bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:40}] {pos}/{len} {per_sec} eta {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_owned());
    bar
}

/// A progress bar that also logs every tenth of the work when the bar is hidden,
/// so runs with redirected output still show how far a long step got.
pub struct Progress {
    bar: ProgressBar,
    label: String,
    len: u64,
    next_log: u64,
}

impl Progress {
    /// Starts tracking `len` units of work labelled `label`.
    pub fn new(len: u64, label: &str) -> Self {
        Self {
            bar: bar(len, label),
            label: label.to_owned(),
            len,
            next_log: len.div_ceil(LOG_STEPS),
        }
    }

    /// Records `done` more units.
    pub fn inc(&mut self, done: u64) {
        self.bar.inc(done);
        let position = self.bar.position();
        if self.bar.is_hidden() && position >= self.next_log && position < self.len {
            let elapsed = self.bar.elapsed().as_secs_f64();
            tracing::info!(step = %self.label, done = position, total = self.len, seconds = format!("{elapsed:.0}"), "progress");
            while self.next_log <= position {
                self.next_log += self.len.div_ceil(LOG_STEPS).max(1);
            }
        }
    }

    /// Completes the bar.
    pub fn finish(self) {
        self.bar.finish();
    }
}
