//! Counters of the server, rendered in Prometheus' text exposition format at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the job latency histogram's buckets: from tiny test checkpoints to
/// full-size CPU generations.
const BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Everything `/metrics` reports that is not read live from the queue.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs that produced their images.
    pub completed: AtomicU64,
    /// Jobs that ended in an error.
    pub failed: AtomicU64,
    /// Jobs cancelled (by DELETE, a client that went away, or shutdown).
    pub cancelled: AtomicU64,
    /// Submissions refused because the queue was full.
    pub rejected: AtomicU64,
    /// Requests answered 4xx for their content (400, 401, 413, ...).
    pub client_errors: AtomicU64,
    /// Connections refused because the connection limit was reached.
    pub refused_connections: AtomicU64,
    /// Histogram of submit-to-finish seconds of completed jobs, per bucket (not cumulative).
    latency_buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of those latencies, in microseconds.
    latency_sum_us: AtomicU64,
}

/// Live values read when `/metrics` is rendered.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    /// Jobs waiting for a worker.
    pub queue_depth: usize,
    /// Queue capacity.
    pub queue_capacity: usize,
    /// Jobs on a worker now.
    pub running: usize,
    /// Worker threads.
    pub workers: usize,
    /// Whether the model is loaded and jobs are accepted.
    pub ready: bool,
}

impl Metrics {
    /// Records one completed job's latency.
    pub fn observe(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    /// Mean latency of completed jobs, if any completed.
    pub fn mean_latency(&self) -> Option<Duration> {
        let n = self.completed.load(Ordering::Relaxed);
        (n > 0).then(|| Duration::from_micros(self.latency_sum_us.load(Ordering::Relaxed) / n))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        metric(
            "omnigen_ready",
            "gauge",
            "1 once the model is loaded and jobs are accepted.",
            u8::from(g.ready).to_string(),
        );
        metric(
            "omnigen_queue_depth",
            "gauge",
            "Jobs waiting for a worker.",
            g.queue_depth.to_string(),
        );
        metric(
            "omnigen_queue_capacity",
            "gauge",
            "Jobs that may wait before submissions are refused with 429.",
            g.queue_capacity.to_string(),
        );
        metric(
            "omnigen_jobs_running",
            "gauge",
            "Jobs on a worker now.",
            g.running.to_string(),
        );
        metric(
            "omnigen_workers",
            "gauge",
            "Generation worker threads.",
            g.workers.to_string(),
        );
        metric(
            "omnigen_jobs_completed_total",
            "counter",
            "Jobs that produced their images.",
            load(&self.completed),
        );
        metric(
            "omnigen_jobs_failed_total",
            "counter",
            "Jobs that ended in an error.",
            load(&self.failed),
        );
        metric(
            "omnigen_jobs_cancelled_total",
            "counter",
            "Jobs cancelled by DELETE, a client that disconnected, or shutdown.",
            load(&self.cancelled),
        );
        metric(
            "omnigen_jobs_rejected_total",
            "counter",
            "Submissions refused with 429 because the queue was full.",
            load(&self.rejected),
        );
        metric(
            "omnigen_client_errors_total",
            "counter",
            "Requests refused with a 4xx status for their content or credentials.",
            load(&self.client_errors),
        );
        metric(
            "omnigen_connections_refused_total",
            "counter",
            "Connections closed at once because the connection limit was reached.",
            load(&self.refused_connections),
        );
        let name = "omnigen_job_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Seconds from submission to the images of completed jobs.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.latency_buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_match() {
        let m = Metrics::default();
        m.observe(Duration::from_millis(30));
        m.observe(Duration::from_millis(700));
        m.observe(Duration::from_secs(4000));
        let text = m.render(Gauges {
            queue_depth: 2,
            queue_capacity: 4,
            running: 1,
            workers: 1,
            ready: true,
        });
        assert!(text.contains("omnigen_job_latency_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("omnigen_job_latency_seconds_bucket{le=\"1\"} 2\n"));
        assert!(text.contains("omnigen_job_latency_seconds_bucket{le=\"1800\"} 2\n"));
        assert!(text.contains("omnigen_job_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("omnigen_job_latency_seconds_count 3\n"));
        assert!(text.contains("omnigen_queue_depth 2\n"));
        assert!(text.contains("omnigen_jobs_completed_total 3\n"));
        assert_eq!(m.mean_latency().unwrap().as_millis(), 4000730 / 3);
    }
}
