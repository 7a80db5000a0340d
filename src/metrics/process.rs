//! Process metrics (`process_*`) read from `/proc` at scrape time, with the
//! names the Prometheus client libraries use, and counters read from a
//! function at scrape time. Written here rather than taken
//! from the prometheus crate's `process` feature, which pulls in procfs and
//! its dependency tree for six numbers.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, IntCounter, IntGauge};

/// A counter whose value lives elsewhere and is read at scrape time.
pub(super) struct CounterFn {
    counter: IntCounter,
    read: fn() -> u64,
}

impl CounterFn {
    pub(super) fn new(name: &str, help: &str, read: fn() -> u64) -> Result<Self, prometheus::Error> {
        Ok(Self { counter: IntCounter::new(name, help)?, read })
    }
}

impl Collector for CounterFn {
    fn desc(&self) -> Vec<&Desc> {
        self.counter.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = (self.read)();
        let seen = self.counter.get();
        if now > seen {
            self.counter.inc_by(now - seen);
        }
        self.counter.collect()
    }
}

/// Process metrics read from `/proc` at scrape time, with the standard
/// names client libraries use.
pub(super) struct ProcessCollector {
    cpu: Counter,
    open_fds: IntGauge,
    max_fds: IntGauge,
    virtual_memory: IntGauge,
    resident_memory: IntGauge,
    start_time: Gauge,
    descs: Vec<Desc>,
}

impl ProcessCollector {
    pub(super) fn new() -> Result<Self, prometheus::Error> {
        let cpu = Counter::new("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.")?;
        let open_fds = IntGauge::new("process_open_fds", "Number of open file descriptors.")?;
        let max_fds = IntGauge::new("process_max_fds", "Maximum number of open file descriptors.")?;
        let virtual_memory = IntGauge::new("process_virtual_memory_bytes", "Virtual memory size in bytes.")?;
        let resident_memory = IntGauge::new("process_resident_memory_bytes", "Resident memory size in bytes.")?;
        let start_time =
            Gauge::new("process_start_time_seconds", "Start time of the process since unix epoch in seconds.")?;
        let mut descs = Vec::new();
        for collector in [&cpu as &dyn Collector, &open_fds, &max_fds, &virtual_memory, &resident_memory, &start_time] {
            descs.extend(collector.desc().into_iter().cloned());
        }
        Ok(Self { cpu, open_fds, max_fds, virtual_memory, resident_memory, start_time, descs })
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(stat) = proc_stat::read() {
            let cpu = stat.cpu_seconds - self.cpu.get();
            if cpu > 0.0 {
                self.cpu.inc_by(cpu);
            }
            self.virtual_memory.set(stat.virtual_bytes);
            self.resident_memory.set(stat.resident_bytes);
            self.start_time.set(stat.start_time_seconds);
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(i64::try_from(entries.count()).unwrap_or(i64::MAX));
        }
        if let Some(limit) = proc_stat::max_fds() {
            self.max_fds.set(limit);
        }
        let mut families = Vec::with_capacity(6);
        for collector in [
            &self.cpu as &dyn Collector,
            &self.open_fds,
            &self.max_fds,
            &self.virtual_memory,
            &self.resident_memory,
            &self.start_time,
        ] {
            families.extend(collector.collect());
        }
        families
    }
}

/// Parsing of `/proc/self/stat`, `/proc/stat` and `/proc/self/limits`.
// sysconf(3) is the only way to learn the clock tick and page size that
// /proc's numbers are counted in; it reads configuration and nothing else.
#[allow(unsafe_code)]
mod proc_stat {
    /// The `/proc/self/stat` fields the collector exports, in its units.
    pub struct Stat {
        /// User plus system time.
        pub cpu_seconds: f64,
        /// `vsize`.
        pub virtual_bytes: i64,
        /// `rss` in pages, times the page size.
        pub resident_bytes: i64,
        /// Boot time plus `starttime`.
        pub start_time_seconds: f64,
    }

    pub fn read() -> Option<Stat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may contain spaces; fields start after its ')'.
        let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split_whitespace().collect();
        // Field numbers from proc(5), minus 3 for pid, comm and the offset.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        // SAFETY: sysconf only reads system configuration.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        let ticks = ticks as f64;
        let boot = boot_time()?;
        Some(Stat {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            virtual_bytes: i64::try_from(field(23)?).ok()?,
            resident_bytes: i64::try_from(field(24)?).ok()?.saturating_mul(page),
            start_time_seconds: boot + field(22)? as f64 / ticks,
        })
    }

    fn boot_time() -> Option<f64> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        text.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
    }

    pub fn max_fds() -> Option<i64> {
        let text = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    }
}
