//! Progress bars for long one-shot commands: drawn on a terminal, silent when stderr is
//! piped or `--quiet` is given.

use std::io::IsTerminal;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar that may be hidden.
pub struct Progress {
    bar: ProgressBar,
    /// Bytes read or written so far, shown beside the item count.
    bytes: AtomicU64,
}

impl Progress {
    /// A bar counting `what` towards `total` (a spinner when the total is unknown); hidden
    /// unless `enabled` and stderr is a terminal.
    pub fn new(enabled: bool, what: &str, total: Option<u64>) -> Progress {
        let visible = enabled && std::io::stderr().is_terminal();
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::no_length(),
        };
        if !visible {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        let template = if total.is_some() {
            "{prefix:>10} [{bar:40}] {human_pos}/{human_len} {msg} {per_sec} ETA {eta}"
        } else {
            "{prefix:>10} {spinner} {human_pos} {msg} {per_sec} {elapsed}"
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("progress templates are valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress {
            bar,
            bytes: AtomicU64::new(0),
        }
    }

    /// A bar that never draws (daemon loops, tests).
    pub fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            bytes: AtomicU64::new(0),
        }
    }

    /// Counts `n` more bytes.
    pub fn add_bytes(&self, n: u64) {
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        if !self.bar.is_hidden() {
            self.bar.set_message(format!("({})", HumanBytes(total)));
        }
    }

    /// Counts `n` more items.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Sets the total.
    pub fn set_total(&self, n: u64) {
        self.bar.set_length(n);
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
