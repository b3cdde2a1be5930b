//! Every Prometheus metric tidemark exports, defined once. Label values are bounded:
//! pipeline, kind, op, outcome, result, error class — never a path or an id.
//! `docs/metrics.md` documents each one; a test checks every one is exported.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The metrics of this process.
pub struct Metrics {
    registry: Registry,
    /// Next offset the log will assign, per pipeline (summed over partitions).
    pub log_head_offset: IntGaugeVec,
    /// Next offset the projector will read, per pipeline (summed over partitions).
    pub committed_offset: IntGaugeVec,
    /// Events appended but not yet applied.
    pub lag_events: IntGaugeVec,
    /// 1 when the last read of the log's offsets succeeded, 0 while the log cannot be read.
    pub log_readable: IntGaugeVec,
    /// Age of the oldest unapplied event; 0 when caught up.
    pub lag_seconds: GaugeVec,
    /// Lag in events of each partition of the log (one series per partition, so a
    /// stalled partition shows even when the others keep the pipeline's lag low).
    pub partition_lag_events: IntGaugeVec,
    /// Age of the oldest unapplied event of each partition; 0 when caught up.
    pub partition_lag_seconds: GaugeVec,
    /// Seconds since the last complete, error-free scan: shows a stalled scanner even
    /// when lag is 0. Before the first one, seconds since the daemon started: 0 would
    /// read as a scan just done.
    pub source_freshness_seconds: GaugeVec,
    /// Events appended, by kind and op.
    pub events_appended: IntCounterVec,
    /// Events projected, by kind and outcome.
    pub applies: IntCounterVec,
    /// Apply errors, by class (`transient` are retried, `permanent` fail their item).
    pub apply_errors: IntCounterVec,
    /// Log records that are not valid events.
    pub decode_errors: IntCounterVec,
    /// Time to apply and commit one batch.
    pub apply_duration: HistogramVec,
    /// Time of one scan.
    pub scan_duration: HistogramVec,
    /// Scans by result (`ok`, `degraded`, `failed`).
    pub scans: IntCounterVec,
    /// Source entries that could not be listed or read.
    pub scan_errors: IntCounterVec,
    /// Scans whose deletes the delete guard withheld.
    pub delete_guard_trips: IntCounterVec,
    /// 1 while the last scan's deletes are withheld by the guard.
    pub delete_guard_active: IntGaugeVec,
    /// Deletes retained while `prune` was off that `max_delete` withholds now that it is on.
    pub retained_deletes_withheld: IntGaugeVec,
    /// Unix time of the last complete, error-free scan.
    pub last_scan_success: GaugeVec,
    /// Unix time of the last batch applied and committed.
    pub last_apply: GaugeVec,
    /// Requests to a source or target API, by side and status class (`2xx`, `3xx`, `4xx`,
    /// `5xx`, `error` for connect/timeout failures).
    pub requests: IntCounterVec,
    /// Requests retried after a transient failure, by side.
    pub retries: IntCounterVec,
    /// Events waiting for the items they reference, and pending directory deletes.
    pub deferred_events: IntGaugeVec,
    /// How long the longest-waiting of them has waited: a count cannot tell an item
    /// waiting for good (a directory holding entries put there by hand) from a stream of
    /// items each waiting a moment.
    pub deferred_age_seconds: GaugeVec,
    /// Items on the failed list (`tidemark status`): what on-call has to fix, which the
    /// counters cannot show since a failing item is tried again and again.
    pub failed_items: IntGaugeVec,
    /// Bytes the sled state database occupies on disk (all pipelines share it).
    pub state_size_bytes: IntGauge,
}

/// The `outcome` of `tidemark_applies_total` for an item that failed again while already
/// on the failed list (a retry, or a later event of it), apart from `failed`, its first
/// failure: the alert pages on first failures only, not on every retry.
pub const FAILED_AGAIN: &str = "failed_again";

/// The `kind` a log record that is not a valid event (undecodable, or of a schema version
/// this build does not know) counts under, as outcome `failed`.
pub const INVALID_KIND: &str = "invalid";

/// Sides of a pipeline that make requests (`side` label).
pub const SIDES: [&str; 2] = ["source", "target"];
/// Status classes of requests (`status_class` label).
pub const STATUS_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "error"];

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definitions are valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let p = &["pipeline"];
        Metrics {
            log_head_offset: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_log_head_offset",
                    "Next offset the event log will assign."
                ),
                p
            )),
            committed_offset: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_committed_offset",
                    "Next offset the projector will read; every event below it is applied."
                ),
                p
            )),
            lag_events: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_lag_events",
                    "Events appended to the log but not yet applied to the target."
                ),
                p
            )),
            log_readable: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_log_readable",
                    "1 when the daemon's last read of the event log's offsets (every second) succeeded; 0 while the log cannot be read (a Kafka broker down), when nothing is appended or applied and the lag gauges keep their last values."
                ),
                p
            )),
            lag_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "tidemark_lag_seconds",
                    "Age of the oldest unapplied event in seconds; 0 when caught up."
                ),
                p
            )),
            partition_lag_events: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_partition_lag_events",
                    "Events appended to one partition of the log but not yet applied."
                ),
                &["pipeline", "partition"]
            )),
            partition_lag_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "tidemark_partition_lag_seconds",
                    "Age of the oldest unapplied event of one partition in seconds; 0 when caught up."
                ),
                &["pipeline", "partition"]
            )),
            source_freshness_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "tidemark_source_freshness_seconds",
                    "Seconds since the last complete, error-free scan of the source; before the first one, seconds since the daemon started."
                ),
                p
            )),
            events_appended: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_events_appended_total",
                    "Events appended to the log."
                ),
                &["pipeline", "kind", "op"]
            )),
            applies: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_applies_total",
                    "Events projected onto the target, by outcome; failed is an item's first failure, failed_again a failure of an item already failed (a retry)."
                ),
                &["pipeline", "kind", "outcome"]
            )),
            apply_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_apply_errors_total",
                    "Apply errors: transient ones are retried, permanent ones fail their item."
                ),
                &["pipeline", "class"]
            )),
            decode_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_log_decode_errors_total",
                    "Log records that are not valid events (skipped and reported)."
                ),
                p
            )),
            apply_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "tidemark_apply_batch_duration_seconds",
                    "Time to apply, sync and commit one batch of events."
                )
                .buckets(exponential_buckets(0.001, 4.0, 10).expect("valid buckets")),
                p
            )),
            scan_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "tidemark_scan_duration_seconds",
                    "Time of one scan of the source."
                )
                .buckets(exponential_buckets(0.01, 4.0, 10).expect("valid buckets")),
                p
            )),
            scans: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_scans_total",
                    "Scans by result: ok, degraded (some entries failed; no deletes), failed."
                ),
                &["pipeline", "result"]
            )),
            scan_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_scan_errors_total",
                    "Source entries that could not be listed or read."
                ),
                p
            )),
            delete_guard_trips: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_delete_guard_trips_total",
                    "Scans whose deletes were withheld by max_delete."
                ),
                p
            )),
            delete_guard_active: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_delete_guard_active",
                    "1 while the last scan's deletes are withheld by max_delete."
                ),
                p
            )),
            retained_deletes_withheld: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_retained_deletes_withheld",
                    "Deletes retained while prune was off that max_delete withholds now that prune is on (none of them is applied until max_delete allows them all); 0 otherwise."
                ),
                p
            )),
            last_scan_success: reg!(GaugeVec::new(
                Opts::new(
                    "tidemark_last_scan_success_timestamp_seconds",
                    "Unix time of the last complete, error-free scan."
                ),
                p
            )),
            last_apply: reg!(GaugeVec::new(
                Opts::new(
                    "tidemark_last_apply_timestamp_seconds",
                    "Unix time of the last batch applied and committed."
                ),
                p
            )),
            requests: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_requests_total",
                    "Requests to the source or target API, by side and status class."
                ),
                &["pipeline", "side", "status_class"]
            )),
            retries: reg!(IntCounterVec::new(
                Opts::new(
                    "tidemark_retries_total",
                    "Requests retried after a transient failure (connect, timeout, 408, 429, 5xx)."
                ),
                &["pipeline", "side"]
            )),
            deferred_events: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_deferred_events",
                    "Events waiting: for the items they reference (applied once those exist, failed after the reference wait), or directory deletes for their directory to be empty."
                ),
                p
            )),
            deferred_age_seconds: reg!(GaugeVec::new(
                Opts::new(
                    "tidemark_deferred_age_seconds",
                    "Seconds the longest-waiting deferred event (tidemark_deferred_events) has waited since it was first deferred; 0 when none waits."
                ),
                p
            )),
            failed_items: reg!(IntGaugeVec::new(
                Opts::new(
                    "tidemark_failed_items",
                    "Items whose last try failed permanently (the failed list of tidemark status); tried again by each run and while the daemon runs."
                ),
                p
            )),
            state_size_bytes: reg!(IntGauge::new(
                "tidemark_state_size_bytes",
                "Bytes the sled state database (log, index, applied state) occupies on disk."
            )),
            registry,
        }
    }

    /// Creates every series of a pipeline at zero, so dashboards and alerts see them
    /// before the first event; `partitions` is the number of partitions of its log, and
    /// `kinds` the kinds its source lists, whose `failed` and `failed_again` applies start
    /// at 0 too, as do the `failed` applies of [`INVALID_KIND`]: Prometheus's `increase`
    /// cannot see a series that appears at 1, so the first failure of a kind would not
    /// raise the failure alert.
    ///
    /// A pipeline this process does not scan (`role = "project"`) gets none of the
    /// scanner's series: a last-scan time of 0 there would fire `TidemarkScannerStale`
    /// forever on a healthy projecting daemon; the scanning daemon exports them.
    pub fn init_pipeline(&self, pipeline: &str, partitions: u32, kinds: &[String], scans: bool) {
        let failed = crate::target::Outcome::Failed.as_str();
        for kind in kinds {
            for outcome in [failed, FAILED_AGAIN] {
                self.applies.with_label_values(&[pipeline, kind, outcome]);
            }
        }
        self.applies
            .with_label_values(&[pipeline, INVALID_KIND, failed]);
        for partition in 0..partitions {
            let labels = [pipeline, &partition.to_string()];
            self.partition_lag_events.with_label_values(&labels);
            self.partition_lag_seconds.with_label_values(&labels);
        }
        for g in [
            &self.log_head_offset,
            &self.committed_offset,
            &self.lag_events,
            &self.log_readable,
            &self.deferred_events,
            &self.failed_items,
            &self.retained_deletes_withheld,
        ] {
            g.with_label_values(&[pipeline]);
        }
        for g in [
            &self.lag_seconds,
            &self.last_apply,
            &self.deferred_age_seconds,
        ] {
            g.with_label_values(&[pipeline]);
        }
        self.decode_errors.with_label_values(&[pipeline]);
        if scans {
            self.delete_guard_active.with_label_values(&[pipeline]);
            for g in [&self.source_freshness_seconds, &self.last_scan_success] {
                g.with_label_values(&[pipeline]);
            }
            for c in [&self.scan_errors, &self.delete_guard_trips] {
                c.with_label_values(&[pipeline]);
            }
        }
        for class in ["transient", "permanent"] {
            self.apply_errors.with_label_values(&[pipeline, class]);
        }
        if scans {
            for result in ["ok", "degraded", "failed", crate::scanner::INTERRUPTED] {
                self.scans.with_label_values(&[pipeline, result]);
            }
            self.scan_duration.with_label_values(&[pipeline]);
        }
        self.apply_duration.with_label_values(&[pipeline]);
        for side in SIDES {
            self.retries.with_label_values(&[pipeline, side]);
            for class in STATUS_CLASSES {
                self.requests.with_label_values(&[pipeline, side, class]);
            }
        }
    }

    /// Sets a Unix-time gauge (`tidemark_*_timestamp_seconds`) of `pipeline` to `at`.
    pub fn set_time(gauge: &GaugeVec, pipeline: &str, at: chrono::DateTime<chrono::Utc>) {
        gauge
            .with_label_values(&[pipeline])
            .set(at.timestamp_millis() as f64 / 1000.0);
    }

    /// Events this process appended, plus those it applied other than `unchanged`: how
    /// much it wrote to the state database since it started.
    pub fn events_written(&self) -> u64 {
        use prometheus::core::Collector;
        let mut n = 0;
        for (vec, skip) in [
            (&self.events_appended, None),
            (&self.applies, Some("unchanged")),
        ] {
            for family in vec.collect() {
                for m in family.get_metric() {
                    let skipped = skip.is_some_and(|skip| {
                        m.get_label()
                            .iter()
                            .any(|l| l.name() == "outcome" && l.value() == skip)
                    });
                    if !skipped {
                        n += m.get_counter().get_value() as u64;
                    }
                }
            }
        }
        n
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("exposition is UTF-8")
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}
