//! The `grpc_server_*` and `grpc_client_*` series, kept per thread and
//! summed when `/metrics` is scraped.
//!
//! Every call bumps its method's started, received, sent and handled
//! counts and its latency histogram. As the prometheus crate's shared
//! atomics that was eight read-modify-writes on cache lines that every
//! core writes, so at full load each one was a cache-line transfer from
//! the other core: profiled under the gRPC benchmark, those few
//! instructions took about 1.6% of keel's CPU, the most of any single
//! step of the call layer. Here each thread writes its own shard (one
//! block of a method's counts, aligned to its own cache lines), so a
//! count is an uncontended add on a line the core already owns, and the
//! scrape, rare by comparison, reads every shard.
//!
//! Written here because the prometheus crate's thread-local counters
//! (`prometheus::local`) only reach the registry when each thread flushes
//! them, which an idle thread never does. The exposition is the same: the
//! families, help texts, labels and buckets of go-grpc-middleware, every
//! series pre-initialised at zero, rendered by the same text encoder.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use tonic::Code;

use super::{ALL_CODES, code_name};

/// Shards per series. Threads past this many share one: still correct,
/// only no longer free of contention. Eight covers the tokio workers of
/// the pods this template targets (and every core of the benchmark VM).
const SHARDS: usize = 8;

/// The upper bounds of the latency histogram: the prometheus client's
/// default buckets (seconds), which go-grpc-middleware uses too.
const BOUNDS: [f64; 11] = *prometheus::DEFAULT_BUCKETS;

/// [`BOUNDS`] in nanoseconds, so an observation compares integers.
const BOUNDS_NANOS: [u64; 11] = {
    let mut nanos = [0u64; 11];
    let mut i = 0;
    while i < nanos.len() {
        // Every bound is a whole number of microseconds.
        nanos[i] = (BOUNDS[i] * 1_000_000.0) as u64 * 1_000;
        i += 1;
    }
    nanos
};

/// This thread's shard: a thread takes the next index the first time it
/// counts, and keeps it. The runtime's workers do nearly all the counting,
/// so with up to [`SHARDS`] threads counting each has its own; past that,
/// or when other threads count too, some share one.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // Const-initialised, so reading it is one load with no lazy-init
        // check: it runs several times per call.
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|shard| {
        let mut index = shard.get();
        if index == usize::MAX {
            index = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            shard.set(index);
        }
        index
    })
}

/// One thread's counts of one series. Aligned to two cache lines (what
/// the adjacent-line prefetcher pairs), so two threads' shards never share
/// a line.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    started: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    /// By code, in [`ALL_CODES`] order.
    handled: [AtomicU64; ALL_CODES.len()],
    /// Observations per bucket, not cumulative; the last is above every
    /// bound (`+Inf`).
    buckets: [AtomicU64; BOUNDS.len() + 1],
    /// The sum of the observed durations, in microseconds: an integer
    /// add, where a float sum needs a compare-and-swap loop. Microseconds,
    /// not nanoseconds: long streams add up fast (a thousand open for a
    /// year is 3·10^16 µs), and a u64 of them lasts 584,000 stream-years.
    sum_micros: AtomicU64,
}

/// One method's series (one label set of each family).
pub(super) struct Series {
    /// The family labels, without `grpc_code`, sorted by name as the
    /// prometheus crate sorts its own.
    labels: Vec<LabelPair>,
    shards: Box<[Shard; SHARDS]>,
}

impl std::fmt::Debug for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Series").field("labels", &self.labels).finish_non_exhaustive()
    }
}

impl Series {
    fn local(&self) -> &Shard {
        &self.shards[shard()]
    }

    pub(super) fn started(&self) {
        self.local().started.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn received(&self, messages: u64) {
        self.local().received.fetch_add(messages, Ordering::Relaxed);
    }

    pub(super) fn sent(&self, messages: u64) {
        self.local().sent.fetch_add(messages, Ordering::Relaxed);
    }

    pub(super) fn handled(&self, code: Code, elapsed: Duration) {
        let shard = self.local();
        // `Code` is the wire number, which is the index in ALL_CODES (the
        // bound only keeps the index in range).
        let index = usize::try_from(code as i32).ok().filter(|i| *i < ALL_CODES.len()).unwrap_or(2);
        shard.handled[index].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NANOS.iter().position(|bound| nanos <= *bound).unwrap_or(BOUNDS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_micros.fetch_add(nanos / 1_000, Ordering::Relaxed);
    }

    /// The sum over shards of one count. Counts are read one after the
    /// other, not at one instant: a series' counts in one scrape may
    /// differ by the calls that ended meanwhile (the histogram's `_sum`
    /// may include one its buckets don't), and every count only grows
    /// from one scrape to the next.
    fn total(&self, count: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|shard| count(shard).load(Ordering::Relaxed)).fold(0, u64::saturating_add)
    }

    fn labels_with(&self, name: &str, value: &str) -> Vec<LabelPair> {
        let mut labels = self.labels.clone();
        labels.push(label(name, value));
        labels.sort_by(|a, b| a.name().cmp(b.name()));
        labels
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

fn counter(labels: Vec<LabelPair>, value: u64) -> Metric {
    let mut metric = Metric::from_label(labels);
    let mut counter = Counter::default();
    // Exact up to 2^53 calls, as the prometheus crate's own counters.
    counter.set_value(value as f64);
    metric.set_counter(counter);
    metric
}

/// The five families of one side (server or client), registered as one
/// collector, and every series made for them.
pub(super) struct Families {
    /// started, handled, msg_received, msg_sent, handling_seconds.
    descs: [Desc; 5],
    /// The variable labels of the families without a code, in order.
    label_names: Vec<String>,
    /// By label values, so asking twice for a series gives the same one.
    series: Mutex<HashMap<Vec<String>, Arc<Series>>>,
}

impl std::fmt::Debug for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Families").field("name", &self.descs[0].fq_name).finish_non_exhaustive()
    }
}

/// A family's name and help text.
pub(super) struct FamilyText {
    pub name: String,
    pub help: String,
}

impl Families {
    /// `texts` in the order of [`Families::descs`]; `labels` are the
    /// variable labels of the families without a code.
    pub(super) fn new(texts: [FamilyText; 5], labels: &[&str]) -> Result<Self, prometheus::Error> {
        let names = |with_code: bool| {
            let mut names: Vec<String> = labels.iter().map(|label| (*label).to_owned()).collect();
            if with_code {
                // After the method, as go-grpc-middleware orders them.
                names.insert(names.len().min(3), "grpc_code".to_owned());
            }
            names
        };
        let [started, handled, received, sent, handling] = texts;
        let desc =
            |text: FamilyText, with_code: bool| Desc::new(text.name, text.help, names(with_code), HashMap::new());
        Ok(Self {
            descs: [
                desc(started, false)?,
                desc(handled, true)?,
                desc(received, false)?,
                desc(sent, false)?,
                desc(handling, false)?,
            ],
            label_names: names(false),
            series: Mutex::new(HashMap::new()),
        })
    }

    /// The series of one label set (values of the labels given to
    /// [`Families::new`], in that order), made at zero the first time.
    pub(super) fn series(&self, values: &[&str]) -> Arc<Series> {
        debug_assert_eq!(values.len(), self.label_names.len(), "one value per label");
        let key: Vec<String> = values.iter().map(|value| (*value).to_owned()).collect();
        let mut all = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.entry(key)
            .or_insert_with(|| {
                let mut labels: Vec<LabelPair> =
                    self.label_names.iter().zip(values).map(|(name, value)| label(name, value)).collect();
                labels.sort_by(|a, b| a.name().cmp(b.name()));
                Arc::new(Series { labels, shards: Box::default() })
            })
            .clone()
    }
}

impl Collector for Families {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let all: Vec<Arc<Series>> = {
            let all = self.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            all.values().cloned().collect()
        };
        let family = |desc: &Desc, kind: MetricType, metrics: Vec<Metric>| {
            let mut family = MetricFamily::default();
            family.set_name(desc.fq_name.clone());
            family.set_help(desc.help.clone());
            family.set_field_type(kind);
            family.set_metric(metrics);
            family
        };
        let plain = |count: fn(&Shard) -> &AtomicU64| -> Vec<Metric> {
            all.iter().map(|series| counter(series.labels.clone(), series.total(count))).collect()
        };
        let handled = all
            .iter()
            .flat_map(|series| {
                ALL_CODES.iter().enumerate().map(|(i, code)| {
                    counter(series.labels_with("grpc_code", code_name(*code)), series.total(|shard| &shard.handled[i]))
                })
            })
            .collect();
        let handling = all
            .iter()
            .map(|series| {
                // The count is the sum of the buckets as read, so `+Inf`
                // and `_count` always agree.
                let mut cumulative = 0u64;
                let mut buckets = Vec::with_capacity(BOUNDS.len());
                for (i, bound) in BOUNDS.iter().enumerate() {
                    cumulative = cumulative.saturating_add(series.total(|shard| &shard.buckets[i]));
                    let mut bucket = Bucket::default();
                    bucket.set_upper_bound(*bound);
                    bucket.set_cumulative_count(cumulative);
                    buckets.push(bucket);
                }
                let count = cumulative.saturating_add(series.total(|shard| &shard.buckets[BOUNDS.len()]));
                let mut histogram = Histogram::default();
                histogram.set_bucket(buckets);
                histogram.set_sample_count(count);
                histogram.set_sample_sum(series.total(|shard| &shard.sum_micros) as f64 / 1e6);
                let mut metric = Metric::from_label(series.labels.clone());
                metric.set_histogram(histogram);
                metric
            })
            .collect();
        vec![
            family(&self.descs[0], MetricType::COUNTER, plain(|shard| &shard.started)),
            family(&self.descs[1], MetricType::COUNTER, handled),
            family(&self.descs[2], MetricType::COUNTER, plain(|shard| &shard.received)),
            family(&self.descs[3], MetricType::COUNTER, plain(|shard| &shard.sent)),
            family(&self.descs[4], MetricType::HISTOGRAM, handling),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_in_nanoseconds_match_the_bounds_in_seconds() {
        for (seconds, nanos) in BOUNDS.iter().zip(BOUNDS_NANOS) {
            assert_eq!(Duration::from_nanos(nanos).as_secs_f64(), *seconds);
        }
    }

    #[test]
    fn counts_from_many_threads_are_all_summed() {
        let families = Families::new(
            ["a", "b", "c", "d", "e"].map(|name| FamilyText { name: format!("t_{name}"), help: "h".into() }),
            &["grpc_type", "grpc_service", "grpc_method"],
        )
        .unwrap();
        let series = families.series(&["unary", "s", "m"]);
        assert!(Arc::ptr_eq(&series, &families.series(&["unary", "s", "m"])), "one series per label set");
        std::thread::scope(|scope| {
            for _ in 0..(SHARDS + 3) {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        series.started();
                        series.handled(Code::NotFound, Duration::from_millis(7));
                    }
                    series.handled(Code::Ok, Duration::from_secs(11));
                });
            }
        });
        let threads = (SHARDS + 3) as u64;
        let collected = families.collect();
        assert_eq!(collected[0].get_metric()[0].get_counter().get_value(), (threads * 1000) as f64);
        let handled = collected[1].get_metric();
        assert_eq!(handled.len(), ALL_CODES.len());
        let by_code = |name: &str| {
            handled
                .iter()
                .find(|m| m.get_label().iter().any(|l| l.name() == "grpc_code" && l.value() == name))
                .map(|m| m.get_counter().get_value())
        };
        assert_eq!(by_code("NotFound"), Some((threads * 1000) as f64));
        assert_eq!(by_code("OK"), Some(threads as f64));
        assert_eq!(by_code("Internal"), Some(0.0));
        let histogram = collected[4].get_metric()[0].get_histogram();
        let buckets = histogram.get_bucket();
        // 7 ms: above 0.005, within 0.01.
        assert_eq!(buckets[0].cumulative_count(), 0);
        assert_eq!(buckets[1].cumulative_count(), threads * 1000);
        assert_eq!(buckets[10].cumulative_count(), threads * 1000, "11 s is above every bound");
        assert_eq!(histogram.get_sample_count(), threads * 1001);
        let sum = histogram.get_sample_sum();
        let expected = threads as f64 * (1000.0 * 0.007 + 11.0);
        assert!((sum - expected).abs() < 1e-6, "{sum} vs {expected}");
    }
}
