//! Binding listeners: every server binds through here, so a taken port is
//! one error that names the config key and the address. Also what every
//! accept loop shares: which accept errors to back off on, and the
//! process's open-file limit.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (the {key} address)")]
pub struct BindError {
    /// The config key the address came from, e.g. `grpc.addr`.
    pub key: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` and reads back the address actually bound, so port 0 works.
pub async fn bind(key: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let fail = |source| BindError { key, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((listener, bound))
}

/// The open-file limits after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// The soft limit in force now.
    pub soft: u64,
    /// The hard limit, the most the soft limit can be raised to.
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Every connection is a
/// descriptor, and the usual soft default (1024) is below what the
/// connection caps allow (`http.max_connections` alone is 4096); the hard
/// limit is what the operator or the container runtime actually granted.
pub fn raise_open_file_limit() -> std::io::Result<OpenFileLimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed
    // by pointer, which lives for both calls. No safe wrapper is in the
    // dependencies, and one syscall pair does not justify a crate.
    #[allow(unsafe_code)]
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(OpenFileLimit { soft: limit.rlim_cur, hard: limit.rlim_max })
}

/// How long an accept loop backs off when accepting fails for lack of
/// resources.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// At most one warning per this interval about failed accepts or refused
/// connections, so an attack or an fd shortage cannot flood the log.
const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// What to do with a failed accept.
#[derive(Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// The process or system is out of something that frees up: wait.
    BackOff,
    /// About this one connection only (reset before accept, and the like):
    /// hand it to the server, which skips it and accepts the next.
    Skip,
}

/// Sorts an accept error: resource exhaustion repeats until something is
/// released, so retrying at once only spins.
pub fn classify_accept_error(error: &io::Error) -> AcceptError {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::BackOff,
        _ if error.kind() == io::ErrorKind::OutOfMemory => AcceptError::BackOff,
        _ => AcceptError::Skip,
    }
}

/// At most one event per [`WARN_INTERVAL`].
#[derive(Default)]
pub struct RateLimit {
    last: Option<Instant>,
}

impl RateLimit {
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < WARN_INTERVAL) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_exhaustion_backs_off_and_the_rest_is_skipped() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(classify_accept_error(&io::Error::from_raw_os_error(errno)), AcceptError::BackOff, "{errno}");
        }
        for errno in [libc::ECONNABORTED, libc::EPERM, libc::EPROTO] {
            assert_eq!(classify_accept_error(&io::Error::from_raw_os_error(errno)), AcceptError::Skip, "{errno}");
        }
        assert_eq!(classify_accept_error(&io::ErrorKind::OutOfMemory.into()), AcceptError::BackOff);
    }
}
