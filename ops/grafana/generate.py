#!/usr/bin/env python3
"""Generates tidemark.json (the Grafana dashboard): python3 ops/grafana/generate.py"""
import json
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
P = 'pipeline=~"$pipeline"'
panels = []
pid = 0
def ts(title, targets, unit="short", x=0, y=0, w=12, h=8, desc="", stack=False, min0=True):
    global pid
    pid += 1
    panels.append({
        "id": pid, "type": "timeseries", "title": title, "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, **({"min": 0} if min0 else {}),
            "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                       "stacking": {"mode": "normal" if stack else "none", "group": "A"}}},
            "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": l}
                    for i, (e, l) in enumerate(targets)],
    })
def stat(title, expr, unit, x, y, w=6, h=4, desc="", thresholds=None, legend="{{pipeline}}", mappings=None, no_value=None, instant=False):
    global pid
    pid += 1
    panels.append({
        "id": pid, "type": "stat", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, **({"mappings": mappings} if mappings else {}), **({"noValue": no_value} if no_value else {}), "thresholds": thresholds or {"mode": "absolute", "steps": [{"color": "green", "value": None}]}}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "area", "textMode": "value_and_name"},
        "targets": [{"datasource": DS, "refId": "A", "expr": expr, "legendFormat": legend,
                     **({"instant": True, "range": False} if instant else {})}],
    })
def row(title, y):
    global pid
    pid += 1
    panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                   "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})

red_at = lambda v: {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": v}]}
# 1 is good, 0 bad (up, tidemark_log_readable).
red_below_1 = {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}
one_zero = lambda good, bad: [{"type": "value", "options": {"1": {"text": good, "color": "green"}, "0": {"text": bad, "color": "red"}}}]
row("Is the target behind?", 0)
stat("Lag (events)", f'tidemark_lag_events{{{P}}}', "short", 0, 1, w=5, desc="Events appended but not yet applied.", thresholds=red_at(1000))
stat("Lag (seconds)", f'tidemark_lag_seconds{{{P}}}', "s", 5, 1, w=5, desc="Age of the oldest unapplied change; 0 when caught up.", thresholds=red_at(600))
# From the timestamp, which is 0 before the first complete scan: "never" then.
stat("Source freshness", f'time() - tidemark_last_scan_success_timestamp_seconds{{{P}}}', "s", 10, 1, w=5,
     desc='Seconds since the last complete, error-free scan; "never" (red) when a pipeline has not had one since its state was created.',
     thresholds=red_at(900), mappings=[{"type": "range", "options": {"from": 1000000000, "to": 1e18, "result": {"text": "never", "color": "red"}}}])
stat("Delete guard", f'tidemark_delete_guard_active{{{P}}}', "short", 15, 1, w=4, desc="1 while the last scan's deletes are withheld by max_delete.", thresholds=red_at(1))
stat("Failed items", f'tidemark_failed_items{{{P}}}', "short", 19, 1, w=5,
     desc="Items on the failed list (`tidemark status` lists them with their reasons). They are tried again by every run and while the daemon runs; the number falls when their cause is fixed.", thresholds=red_at(1))
# Not filtered by $pipeline: a daemon that cannot be scraped has no pipeline series left.
stat("Scrape target (up)", 'up{job=~"tidemark.*"}', "short", 0, 5, w=8, legend="{{instance}}",
     desc="Whether Prometheus scrapes each tidemark daemon (jobs named tidemark…). \"down\": the scrape fails (TidemarkDown); \"no scrape target\": Prometheus has no tidemark target at all (TidemarkAbsent), so every other panel and alert is blind.",
     thresholds=red_below_1, mappings=one_zero("up", "down"), no_value="no scrape target")
stat("Event log readable", f'tidemark_log_readable{{{P}}}', "short", 8, 5, w=8,
     desc="Whether the daemon's last read of the event log (every second) succeeded. \"unreadable\" (a Kafka broker down or unreachable): nothing is appended or applied and the lag panels keep their last values (TidemarkLogUnreachable after 2 minutes).",
     thresholds=red_below_1, mappings=one_zero("readable", "unreadable"))
stat("Oldest waiting item", f'tidemark_deferred_age_seconds{{{P}}}', "s", 16, 5, w=8,
     desc="How long the longest-waiting deferred item has waited (0: none waits); red past an hour (TidemarkItemsWaiting). `tidemark status` lists them with what they wait for.",
     thresholds=red_at(3600))
ts("Lag in events per pipeline", [(f'tidemark_lag_events{{{P}}}', "{{pipeline}}"), (f'tidemark_deferred_events{{{P}}}', "{{pipeline}} deferred")], "short", 0, 9,
   desc="Events appended to the log but not yet applied to the target.")
ts("Lag in seconds per pipeline", [(f'tidemark_lag_seconds{{{P}}}', "{{pipeline}}"),
                                    (f'tidemark_deferred_age_seconds{{{P}}}', "{{pipeline}} oldest waiting item")], "s", 12, 9,
   desc="Age of the oldest unapplied event. Grows while the projector is stuck, even if the source is idle. The oldest waiting item: how long the longest-waiting deferred item has waited (`tidemark status` lists them); one that keeps rising waits for good, most likely for a directory on the target to be emptied by hand.")
ts("Log head and committed offset", [(f'tidemark_log_head_offset{{{P}}}', "{{pipeline}} head"),
                                      (f'tidemark_committed_offset{{{P}}}', "{{pipeline}} committed")], "short", 0, 17,
   desc="The gap between the lines is the lag in events.")
ts("Events appended by op", [(f'sum by (pipeline, op) (rate(tidemark_events_appended_total{{{P}}}[$__rate_interval]))', "{{pipeline}} {{op}}")],
   "ops", 12, 17, desc="Changes the scanner found, per second.")
row("What is it doing?", 25)
ts("Apply rate by outcome", [(f'sum by (pipeline, outcome) (rate(tidemark_applies_total{{{P}}}[$__rate_interval]))', "{{pipeline}} {{outcome}}")],
   "ops", 0, 26, stack=True, desc="Events projected per second: created, updated, adopted, deleted, unchanged, stale, deferred, failed (an item's first failure), failed_again (a retry of a failed item that failed again), retained.")
ts("Apply batch duration", [
    (f'histogram_quantile(0.5, sum by (pipeline, le) (rate(tidemark_apply_batch_duration_seconds_bucket{{{P}}}[$__rate_interval])))', "{{pipeline}} p50"),
    (f'histogram_quantile(0.95, sum by (pipeline, le) (rate(tidemark_apply_batch_duration_seconds_bucket{{{P}}}[$__rate_interval])))', "{{pipeline}} p95"),
    (f'sum by (pipeline) (rate(tidemark_apply_batch_duration_seconds_sum{{{P}}}[$__rate_interval])) / sum by (pipeline) (rate(tidemark_apply_batch_duration_seconds_count{{{P}}}[$__rate_interval]))', "{{pipeline}} mean"),
], "s", 12, 26, desc="Time to apply, make durable and commit one batch.")
row("Errors and retries", 34)
ts("Errors", [
    (f'sum by (pipeline, class) (rate(tidemark_apply_errors_total{{{P}}}[$__rate_interval]))', "{{pipeline}} apply {{class}}"),
    (f'sum by (pipeline) (rate(tidemark_applies_total{{{P}, outcome="failed"}}[$__rate_interval]))', "{{pipeline}} newly failed items"),
    (f'sum by (pipeline) (rate(tidemark_applies_total{{{P}, outcome="failed_again"}}[$__rate_interval]))', "{{pipeline}} failed again (retries)"),
    (f'sum by (pipeline) (rate(tidemark_scan_errors_total{{{P}}}[$__rate_interval]))', "{{pipeline}} scan errors"),
    (f'sum by (pipeline) (rate(tidemark_log_decode_errors_total{{{P}}}[$__rate_interval]))', "{{pipeline}} undecodable records"),
], "ops", 0, 35, desc="Transient apply errors are retried; a failed item is tried again by the next run, while the daemon runs (failed_retry_interval, the pause doubling up to an hour) and when it changes: its first failure counts as newly failed, retries that fail again as failed again (see `tidemark status`).")
ts("Retries and requests", [
    (f'sum by (pipeline, side) (rate(tidemark_retries_total{{{P}}}[$__rate_interval]))', "{{pipeline}} {{side}} retries"),
    (f'sum by (pipeline, side, status_class) (rate(tidemark_requests_total{{{P}}}[$__rate_interval]))', "{{pipeline}} {{side}} {{status_class}}"),
], "reqps", 12, 35, desc="Requests to REST sources and targets by status class, and retries after transient failures.")
# Over $__range only as one instant query at the range's end: on a time series each point
# counted the trips of a whole range before it, reaching before the range on the left.
ts("Delete guard", [
    (f'tidemark_delete_guard_active{{{P}}}', "{{pipeline}} withholding deletes"),
    (f'tidemark_retained_deletes_withheld{{{P}}}', "{{pipeline}} retained deletes withheld"),
], "short", 0, 43, w=8,
   desc="1 while the last scan's deletes are withheld by max_delete (TidemarkDeleteGuardTripped): when the guard held, and for how long. Also the number of deletes retained while prune was off that max_delete withholds once prune is on (TidemarkRetainedDeletesWithheld).")
stat("Delete guard trips in the time range", f'round(sum by (pipeline) (increase(tidemark_delete_guard_trips_total{{{P}}}[$__range])))', "short", 8, 43, w=4, h=8,
     desc="Scans whose deletes max_delete withheld, from the start to the end of the dashboard's time range (a guard that stays tripped counts at every scan).",
     thresholds=red_at(1), instant=True)
ts("Scans by result", [(f'sum by (pipeline, result) (increase(tidemark_scans_total{{{P}}}[$__rate_interval]))', "{{pipeline}} {{result}}")],
   "short", 12, 43, stack=True, desc="ok; degraded (some entries failed: no deletes); failed.")
row("Scanner", 51)
ts("Scan duration", [
    (f'histogram_quantile(0.5, sum by (pipeline, le) (rate(tidemark_scan_duration_seconds_bucket{{{P}}}[$__rate_interval])))', "{{pipeline}} p50"),
    (f'histogram_quantile(0.95, sum by (pipeline, le) (rate(tidemark_scan_duration_seconds_bucket{{{P}}}[$__rate_interval])))', "{{pipeline}} p95"),
], "s", 0, 52, desc="How long one listing and diff of the source takes.")
ts("Source freshness", [
    (f'tidemark_source_freshness_seconds{{{P}}}', "{{pipeline}}"),
    (f'time() - (tidemark_last_scan_success_timestamp_seconds{{{P}}} > 0)', "{{pipeline}} (from timestamp)"),
    (f'time() - (tidemark_last_apply_timestamp_seconds{{{P}}} > 0)', "{{pipeline}} since last apply"),
], "s", 12, 52, desc="Seconds since the last complete, error-free scan; a saw-tooth of scan_interval is healthy, a rising line is a stalled scanner.")
row("Partitions (Kafka log)", 60)
ts("Lag in events per partition", [(f'tidemark_partition_lag_events{{{P}}}', "{{pipeline}} p{{partition}}")], "short", 0, 61,
   desc="One line per partition of the log; a partition that keeps rising while the others stay at 0 is one no projector applies (a sled log has partition 0 only).")
ts("Lag in seconds per partition", [(f'tidemark_partition_lag_seconds{{{P}}}', "{{pipeline}} p{{partition}}")], "s", 12, 61,
   desc="Age of the oldest unapplied event of each partition.")
row("State (sled)", 69)
ts("State on disk", [("tidemark_state_size_bytes", "{{instance}}")], "bytes", 0, 70, min0=False,
   desc="Bytes the sled state in state_dir occupies (log, index, applied state of every pipeline). It grows with every change; `tidemark compact` with the daemon stopped gives back what sled has not reclaimed (docs/operations.md, \"Disk used by the state\").")
ts("State growth per day", [("deriv(tidemark_state_size_bytes[6h]) * 86400", "{{instance}}")], "bytes", 12, 70, min0=False,
   desc="How fast the state grows, over the last 6 hours, as bytes per day: divide the free space of the state disk by this to know when to compact.")

dash = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "The Prometheus that scrapes tidemark",
                  "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "9.0.0"},
                   {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
                   {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
                   {"type": "panel", "id": "stat", "name": "Stat", "version": ""}],
    "uid": "tidemark",
    "title": "tidemark",
    "description": "tidemark sync daemon: lag, applies, errors, retries, scans. Metrics: docs/metrics.md.",
    "tags": ["tidemark"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "DS_PROMETHEUS", "type": "datasource", "query": "prometheus", "label": "Data source", "hide": 0,
         "current": {}, "options": [], "refresh": 1, "regex": ""},
        {"name": "pipeline", "type": "query", "label": "Pipeline", "datasource": DS,
         "query": {"query": "label_values(tidemark_lag_events, pipeline)", "refId": "pipeline"},
         "definition": "label_values(tidemark_lag_events, pipeline)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": []},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
import pathlib
pathlib.Path(__file__).with_name("tidemark.json").write_text(json.dumps(dash, indent=2) + "\n")
