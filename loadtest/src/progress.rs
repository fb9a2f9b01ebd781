//! Progress bars on stderr for long runs (indicatif). They draw only when stderr is a
//! terminal, so `--json` output, pipes and CI logs stay clean.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar that is cleared when finished or dropped.
pub struct Progress(ProgressBar);

impl Progress {
    /// Counts `done` of `total` (edges joined, connections opened...).
    pub fn count(what: &str, total: u64) -> Progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        Progress(bar)
    }

    /// A timed phase of `duration`, ticking by itself until finished.
    pub fn timed(what: &str, duration: Duration) -> Progress {
        let bar = ProgressBar::new(duration.as_millis() as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {elapsed}/{duration}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        let ticker = bar.clone();
        let started = std::time::Instant::now();
        std::thread::spawn(move || {
            while !ticker.is_finished() {
                ticker.set_position(started.elapsed().as_millis() as u64);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Progress(bar)
    }

    /// Set the count.
    pub fn set(&self, done: u64) {
        self.0.set_position(done);
    }

    /// Done: clear the bar.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
