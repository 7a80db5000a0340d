//! Process metrics (`process_*`) read from `/proc` at scrape time, with the
//! names the Prometheus client libraries use; the container's memory limit
//! read from the cgroup filesystem; and counters, gauges and info series
//! read from a function at scrape time. Written here rather than taken
//! from the prometheus crate's `process` feature, which pulls in procfs and
//! its dependency tree for six numbers.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, IntCounter, IntGauge, IntGaugeVec, Opts};

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

/// A gauge whose value is computed at scrape time, so the request path
/// keeps no second copy of a number it already has (an atomic, a flag).
pub(super) struct GaugeFn {
    gauge: Gauge,
    read: Box<dyn Fn() -> f64 + Send + Sync>,
}

impl GaugeFn {
    pub(super) fn new(
        name: &str,
        help: &str,
        read: Box<dyn Fn() -> f64 + Send + Sync>,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self { gauge: Gauge::new(name, help)?, read })
    }
}

impl Collector for GaugeFn {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge.set((self.read)());
        self.gauge.collect()
    }
}

/// An info series (`name{label="value"} 1`) whose label value is read at
/// scrape time: exactly one series, the current value, so a change shows
/// as the old series ending and a new one starting.
pub(super) struct InfoFn {
    vec: IntGaugeVec,
    read: Box<dyn Fn() -> String + Send + Sync>,
}

impl InfoFn {
    pub(super) fn new(
        name: &str,
        help: &str,
        label: &str,
        read: Box<dyn Fn() -> String + Send + Sync>,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self { vec: IntGaugeVec::new(Opts::new(name, help), &[label])?, read })
    }
}

impl Collector for InfoFn {
    fn desc(&self) -> Vec<&Desc> {
        self.vec.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.vec.reset();
        self.vec.with_label_values(&[(self.read)().as_str()]).set(1);
        self.vec.collect()
    }
}

/// `keel_container_memory_limit_bytes`: the memory limit of the cgroup the
/// process runs in (the container's `resources.limits.memory`), read at
/// scrape time because Kubernetes can resize a pod in place. Absent when
/// there is no limit, so a ratio against it has no data rather than a
/// meaningless near-zero value.
pub(super) struct MemoryLimitCollector {
    gauge: IntGauge,
}

impl MemoryLimitCollector {
    pub(super) fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            gauge: IntGauge::new(
                "keel_container_memory_limit_bytes",
                "Memory limit of the process' cgroup (the container limit); absent when unlimited.",
            )?,
        })
    }
}

impl Collector for MemoryLimitCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match cgroup::memory_limit().and_then(|limit| i64::try_from(limit).ok()) {
            Some(limit) => {
                self.gauge.set(limit);
                self.gauge.collect()
            }
            None => Vec::new(),
        }
    }
}

/// Finding the memory limit under cgroup v2 or v1.
mod cgroup {
    use std::path::{Path, PathBuf};

    /// Values at or above this mean "no limit": cgroup v1 reports the
    /// largest page-aligned i64 rather than a word.
    const UNLIMITED: u64 = 1 << 62;

    /// The memory limit in bytes, or `None` when there is none or no cgroup
    /// filesystem is mounted.
    pub fn memory_limit() -> Option<u64> {
        let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        memory_limit_in(Path::new("/sys/fs/cgroup"), &membership)
    }

    /// The limit under `root`, for the process whose `/proc/self/cgroup` is
    /// `membership`. Inside a container the cgroup namespace makes the
    /// process' own group the root, so both the listed path and the root
    /// are tried, the listed path first.
    pub fn memory_limit_in(root: &Path, membership: &str) -> Option<u64> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        for line in membership.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let relative = path.trim_start_matches('/');
            if controllers.is_empty() {
                candidates.push(root.join(relative).join("memory.max"));
                candidates.push(root.join("unified").join(relative).join("memory.max"));
            } else if controllers.split(',').any(|c| c == "memory") {
                candidates.push(root.join("memory").join(relative).join("memory.limit_in_bytes"));
            }
        }
        candidates.push(root.join("memory.max"));
        candidates.push(root.join("memory/memory.limit_in_bytes"));
        let value = candidates.iter().find_map(|path| std::fs::read_to_string(path).ok())?;
        let value = value.trim();
        if value == "max" {
            return None;
        }
        value.parse::<u64>().ok().filter(|limit| *limit < UNLIMITED)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A scratch directory holding `files`, removed when dropped.
        struct Tree(PathBuf);

        impl Tree {
            fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Tree {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        fn tree(files: &[(&str, &str)]) -> Tree {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("keel-cgroup-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for (path, content) in files {
                let path = dir.join(path);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, content).unwrap();
            }
            Tree(dir)
        }

        #[test]
        fn reads_v2_v1_and_treats_huge_or_max_as_unlimited() {
            let v2 = tree(&[("kubepods/pod1/memory.max", "268435456\n")]);
            assert_eq!(memory_limit_in(v2.path(), "0::/kubepods/pod1\n"), Some(268_435_456));
            // In a cgroup namespace the group is the root.
            let namespaced = tree(&[("memory.max", "134217728\n")]);
            assert_eq!(memory_limit_in(namespaced.path(), "0::/\n"), Some(134_217_728));
            let unlimited = tree(&[("memory.max", "max\n")]);
            assert_eq!(memory_limit_in(unlimited.path(), "0::/\n"), None);
            let v1 = tree(&[("memory/docker/abc/memory.limit_in_bytes", "536870912\n")]);
            assert_eq!(memory_limit_in(v1.path(), "4:memory:/docker/abc\n1:cpu:/\n"), Some(536_870_912));
            let v1_unlimited = tree(&[("memory/memory.limit_in_bytes", "9223372036854771712\n")]);
            assert_eq!(memory_limit_in(v1_unlimited.path(), "4:memory:/\n"), None);
            assert_eq!(memory_limit_in(tree(&[]).path(), "0::/\n"), None);
        }
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
