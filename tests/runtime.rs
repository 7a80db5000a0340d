//! `runtime.worker_threads` sizes the tokio pool of the built binary: the
//! threads of the running process are counted in /proc, for the explicit
//! setting and for the default (one per CPU the process may use).

mod support;

use std::time::Duration;

use anyhow::{Context as _, Result};
use support::process::KeelProcess;

/// The process's tokio worker threads (named `tokio-rt-worker`).
fn workers(pid: u32) -> Result<usize> {
    let mut count = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        if comm.trim() == "tokio-rt-worker" {
            count += 1;
        }
    }
    Ok(count)
}

fn workers_of(env: &[(&str, &str)]) -> Result<usize> {
    let mut env = env.to_vec();
    env.push(("KEEL__SHUTDOWN__DRAIN_DELAY", "0s"));
    let mut keel = KeelProcess::start(&env)?;
    let count = workers(keel.pid());
    keel.signal("TERM")?;
    keel.wait_exit(Duration::from_secs(30))?;
    count
}

#[test]
fn worker_threads_sets_the_pool_and_zero_follows_the_cpus() -> Result<()> {
    assert_eq!(workers_of(&[("KEEL__RUNTIME__WORKER_THREADS", "3")])?, 3);
    assert_eq!(workers_of(&[("KEEL__RUNTIME__WORKER_THREADS", "1")])?, 1);
    let cpus = std::thread::available_parallelism().context("available_parallelism")?.get();
    assert_eq!(workers_of(&[])?, cpus, "the default is one worker per CPU tokio sees");
    Ok(())
}
