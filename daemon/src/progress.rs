//! Progress bars for long one-shot commands: drawn on a terminal, silent when stderr is
//! piped or `--quiet` is given; and the log writer that keeps log lines above the bars.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Every visible bar of the process, one line each at the bottom of the terminal. One
/// owner of those lines is what lets a log line be written above them ([`LogWriter`]):
/// bars drawing on their own would each redraw over it and leave stale frames behind.
static BARS: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

/// Visible bars not finished yet: while there are none, log lines go straight to stderr.
static ON_SCREEN: AtomicUsize = AtomicUsize::new(0);

/// A progress bar that may be hidden; removed from the terminal when finished or dropped.
pub struct Progress {
    bar: ProgressBar,
    /// Bytes read or written so far, shown beside the item count.
    bytes: AtomicU64,
    /// Whether the bar is one of [`BARS`] (and counted in [`ON_SCREEN`]) until finished.
    on_screen: AtomicBool,
    /// Set for a bar whose total comes later ([`Progress::counting`]): a spinner until
    /// [`Progress::set_remaining`] gives one.
    awaits_total: AtomicBool,
}

impl Progress {
    /// A bar counting `what` towards `total` (a spinner when the total is unknown); hidden
    /// unless `enabled` and stderr is a terminal. Visible bars stack, one line each, in
    /// the order they were made (`sync` scans and projects at once).
    pub fn new(enabled: bool, what: &str, total: Option<u64>) -> Progress {
        // Hidden from the start: styling a bar drawn on stderr would draw a frame of it
        // there, outside the bars' lines, even for a bar that is then hidden.
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden())
            .with_style(style(total.is_some()))
            .with_prefix(what.to_owned());
        let visible = enabled && std::io::stderr().is_terminal();
        if visible {
            ON_SCREEN.fetch_add(1, Ordering::SeqCst);
            BARS.add(bar.clone());
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Progress {
            bar,
            bytes: AtomicU64::new(0),
            on_screen: AtomicBool::new(visible),
            awaits_total: AtomicBool::new(false),
        }
    }

    /// A bar counting `what` towards a total not known yet: a spinner until
    /// [`Progress::set_remaining`] gives the total (a bar of length 0 drew as full, `0/0`,
    /// before `project` had read the log's offsets).
    pub fn counting(enabled: bool, what: &str) -> Progress {
        let progress = Progress::new(enabled, what, None);
        progress.awaits_total.store(true, Ordering::Relaxed);
        progress
    }

    /// A bar that never draws (daemon loops, tests).
    pub fn hidden() -> Progress {
        Progress::new(false, "", None)
    }

    /// Counts `n` more bytes. None counted, none shown: items without bytes (REST
    /// resources) would read `(0 B)`.
    pub fn add_bytes(&self, n: u64) {
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        if total > 0 && !self.bar.is_hidden() {
            self.bar.set_message(format!("({})", HumanBytes(total)));
        }
    }

    /// Counts `n` more items.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Sets the total to what is counted so far plus `n` still to come; a bar made by
    /// [`Progress::counting`] turns from a spinner into a bar then, unless the total is 0.
    pub fn set_remaining(&self, n: u64) {
        let total = self.bar.position() + n;
        if total > 0 && self.awaits_total.swap(false, Ordering::Relaxed) {
            self.bar.set_style(style(true));
        }
        self.bar.set_length(total);
    }

    /// Starts counting again, from 0 towards `total`, as a bar (`verify` counts the source
    /// as it lists it, then the items compared).
    pub fn count_to(&self, total: u64) {
        self.bar.set_style(style(true));
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.reset_eta();
    }

    /// Removes the bar from the terminal, leaving no line of it behind.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if self.on_screen.swap(false, Ordering::SeqCst) {
            BARS.remove(&self.bar);
            ON_SCREEN.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Progress {
    /// A command that fails midway leaves no bar drawn over its error.
    fn drop(&mut self) {
        self.finish();
    }
}

fn style(counted: bool) -> ProgressStyle {
    // `per_sec`'s width is its precision: whole items a second.
    let template = if counted {
        "{prefix:>10} [{bar:40}] {human_pos}/{human_len} {msg} {per_sec:0} ETA {eta}"
    } else {
        "{prefix:>10} {spinner} {human_pos} {msg} {per_sec:0} {elapsed}"
    };
    ProgressStyle::with_template(template)
        .expect("progress templates are valid")
        .progress_chars("=> ")
}

/// The log's writer: stderr, with the bars taken off the terminal while a line is written
/// and drawn again below it, so a log line is neither cut by a redraw nor left under a
/// stale frame. The fmt layer writes each event with one `write_all`.
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // No secret reaches the log, whichever connector's message quotes it.
        let text = std::str::from_utf8(buf).map(crate::http::redact_known);
        let buf = match &text {
            Ok(text) => text.as_bytes(),
            Err(_) => buf,
        };
        let write = || std::io::stderr().write_all(buf);
        if ON_SCREEN.load(Ordering::SeqCst) > 0 {
            BARS.suspend(write)
        } else {
            write()
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
