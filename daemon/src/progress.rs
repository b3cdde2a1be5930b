//! Progress bars for long one-shot commands: drawn on a terminal, silent when stderr is
//! piped or `--quiet` is given.

use std::io::IsTerminal;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

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
        let bar = Progress::styled(what, total);
        if !visible {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress {
            bar,
            bytes: AtomicU64::new(0),
        }
    }

    fn styled(what: &str, total: Option<u64>) -> ProgressBar {
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::no_length(),
        };
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
        bar
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

    /// Sets the total to what is counted so far plus `n` still to come.
    pub fn set_remaining(&self, n: u64) {
        self.bar.set_length(self.bar.position() + n);
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Bars drawn together, one line each, for work that runs side by side (`sync` scans and
/// projects at once); hidden unless enabled and stderr is a terminal.
pub struct ProgressGroup {
    multi: MultiProgress,
}

impl ProgressGroup {
    /// A group drawn on stderr when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> ProgressGroup {
        let multi = MultiProgress::new();
        if !(enabled && std::io::stderr().is_terminal()) {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        ProgressGroup { multi }
    }

    /// A bar in this group, as [`Progress::new`] describes.
    pub fn bar(&self, what: &str, total: Option<u64>) -> Progress {
        let bar = self.multi.add(Progress::styled(what, total));
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress {
            bar,
            bytes: AtomicU64::new(0),
        }
    }
}
