//! Secrets and certificates mounted as files: read at start, re-read when
//! their content changes, and swapped in without a restart.
//!
//! One convention for every secret (tokens, database URL, client tokens,
//! TLS keys). The kubelet updates a mounted Secret by swapping the `..data`
//! symlink of the volume, which an inotify watch on the file itself never
//! sees, so the files are polled: every `interval` their bytes are read and
//! compared with the last ones seen. Secrets are small, so a read every few
//! seconds costs nothing, and polling works the same on every filesystem.
//! (The `notify` crate would need a directory watch plus symlink handling
//! and still a fallback poll on network filesystems.)
//!
//! A reload that fails (a missing file, or content `parse` refuses) keeps
//! the old value, logs a warning naming the secret and the cause, and is
//! counted in `keel_secret_reloads_total{secret, result="error"}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounterVec;

/// How often mounted secrets are re-read. The kubelet's own sync period is
/// about a minute, so a few seconds adds nothing noticeable to a rotation.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be read.
    #[error("cannot read {secret} from {path}")]
    Read {
        /// The secret's name (its config key), for the message.
        secret: &'static str,
        /// The file that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its content is not a valid value.
    #[error("{secret} from {path} is invalid: {reason}")]
    Invalid {
        /// The secret's name (its config key), for the message.
        secret: &'static str,
        /// The first of the files that make up the value.
        path: PathBuf,
        /// What `parse` refused.
        reason: String,
    },
}

/// The current value of a secret read from files. Cloning is cheap and
/// every clone sees reloads.
pub struct Watched<T> {
    current: Current<T>,
}

enum Current<T> {
    /// Never reloaded: read as it is, with no swap to go through (an
    /// `ArcSwap` load was a third of the static-token check of every call).
    Fixed(Arc<T>),
    /// Swapped whole on reload. `ArcSwap` rather than a lock: every call
    /// reads the static tokens, and a read lock, shared by all cores, was a
    /// contended write to one cache line per call.
    Swapped(Arc<ArcSwap<T>>),
}

/// A borrowed look at a [`Watched`] value; see [`Watched::peek`].
pub enum Peek<'a, T> {
    Fixed(&'a T),
    Swapped(arc_swap::Guard<Arc<T>>),
}

impl<T> std::ops::Deref for Peek<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        match self {
            Self::Fixed(value) => value,
            Self::Swapped(guard) => guard,
        }
    }
}

impl<T> Clone for Watched<T> {
    fn clone(&self) -> Self {
        let current = match &self.current {
            Current::Fixed(value) => Current::Fixed(value.clone()),
            Current::Swapped(swap) => Current::Swapped(swap.clone()),
        };
        Self { current }
    }
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value: it is a secret.
        f.write_str("Watched(..)")
    }
}

impl<T> Watched<T> {
    /// A value that never changes (a secret given inline in config, or a
    /// test), so callers handle both cases alike.
    pub fn fixed(value: T) -> Self {
        Self { current: Current::Fixed(Arc::new(value)) }
    }

    /// The value as of the last successful read.
    pub fn get(&self) -> Arc<T> {
        match &self.current {
            Current::Fixed(value) => value.clone(),
            Current::Swapped(swap) => swap.load_full(),
        }
    }

    /// The value as of the last successful read, borrowed for a moment (a
    /// request's check): no reference count is touched.
    pub fn peek(&self) -> Peek<'_, T> {
        match &self.current {
            Current::Fixed(value) => Peek::Fixed(value),
            Current::Swapped(swap) => Peek::Swapped(swap.load()),
        }
    }

    fn set(current: &ArcSwap<T>, value: T) {
        current.store(Arc::new(value));
    }
}

type Parser<T> = dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync;

/// Reads `paths` now and returns their parsed value; then, when called
/// within a tokio runtime, polls them every `interval` and swaps in a new
/// value whenever their bytes change and `parse` accepts them. The poll
/// task ends when every [`Watched`] clone is dropped.
///
/// `secret` names the value in logs and metrics: use its config key, for
/// example `auth.tokens_file`. `parse` gets the files' contents in the
/// order of `paths` (a certificate and its key are one value).
pub fn watch<T, F>(
    secret: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    parse: F,
) -> Result<Watched<T>, SecretFileError>
where
    T: Send + Sync + 'static,
    F: Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
{
    let contents = read_all(secret, &paths)?;
    let value = parse(&contents).map_err(|reason| SecretFileError::Invalid {
        secret,
        path: paths.first().cloned().unwrap_or_default(),
        reason,
    })?;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Nothing can poll the files: the value is fixed.
        return Ok(Watched::fixed(value));
    };
    let swap = Arc::new(ArcSwap::from_pointee(value));
    runtime.spawn(poll(secret, paths, interval, Box::new(parse), contents, Arc::downgrade(&swap)));
    Ok(Watched { current: Current::Swapped(swap) })
}

async fn poll<T: Send + Sync + 'static>(
    secret: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    parse: Box<Parser<T>>,
    mut last: Vec<Vec<u8>>,
    current: Weak<ArcSwap<T>>,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // A failure is logged once per distinct content, not on every tick.
    let mut failed: Option<Vec<Vec<u8>>> = None;
    loop {
        ticker.tick().await;
        let Some(current) = current.upgrade() else { return };
        let contents = match read_all(secret, &paths) {
            Ok(contents) => contents,
            Err(error) => {
                if failed.as_ref().is_none_or(|f| !f.is_empty()) {
                    tracing::warn!(secret, error = %crate::telemetry::chain(&error), "secret reload failed; keeping the old value");
                    record(secret, "error");
                    failed = Some(Vec::new());
                }
                continue;
            }
        };
        if contents == last || failed.as_ref() == Some(&contents) {
            continue;
        }
        match parse(&contents) {
            Ok(value) => {
                Watched::set(&current, value);
                tracing::info!(secret, "secret reloaded from its file");
                record(secret, "ok");
                last = contents;
                failed = None;
            }
            Err(reason) => {
                tracing::warn!(secret, %reason, "secret reload failed; keeping the old value");
                record(secret, "error");
                failed = Some(contents);
            }
        }
    }
}

fn read_all(secret: &'static str, paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, SecretFileError> {
    paths.iter().map(|path| read_one(secret, path)).collect()
}

fn read_one(secret: &'static str, path: &Path) -> Result<Vec<u8>, SecretFileError> {
    std::fs::read(path).map_err(|source| SecretFileError::Read { secret, path: path.to_path_buf(), source })
}

/// Reads a one-value secret file: its content with surrounding whitespace
/// (the trailing newline editors and `kubectl create secret --from-file`
/// leave) removed. An empty file is refused.
pub fn trimmed_utf8(contents: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(contents).map_err(|_| "the file is not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("the file is empty".to_string());
    }
    Ok(text.to_string())
}

static RELOADS: OnceLock<Option<IntCounterVec>> = OnceLock::new();

/// `keel_secret_reloads_total{secret, result}`: one family for the whole
/// process (the poll tasks are process-wide), registered into each app's
/// registry by the app.
pub fn reloads_collector() -> Option<IntCounterVec> {
    RELOADS
        .get_or_init(|| {
            IntCounterVec::new(
                prometheus::Opts::new(
                    "keel_secret_reloads_total",
                    "Reloads of secrets mounted as files, by secret and result (ok, error); a failed reload keeps the old value.",
                ),
                &["secret", "result"],
            )
            .ok()
        })
        .clone()
}

fn record(secret: &'static str, result: &str) {
    if let Some(counter) = reloads_collector() {
        counter.with_label_values(&[secret, result]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(contents: &[Vec<u8>]) -> Result<String, String> {
        trimmed_utf8(&contents[0])
    }

    async fn eventually(mut ok: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_changed_file_is_swapped_in_and_a_bad_one_keeps_the_old_value() {
        let dir = std::env::temp_dir().join(format!("keel-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let watched = watch("test.token_file", vec![path.clone()], Duration::from_millis(20), parse_text).unwrap();
        assert_eq!(*watched.get(), "first");

        // The kubelet's way: a new file renamed over the old one.
        let staged = dir.join("token.new");
        std::fs::write(&staged, "second").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        assert!(eventually(|| *watched.get() == "second").await, "the new content was never seen");

        std::fs::write(&path, "  \n").unwrap();
        let before = reloads_collector().unwrap().with_label_values(&["test.token_file", "error"]).get();
        assert!(
            eventually(|| reloads_collector().unwrap().with_label_values(&["test.token_file", "error"]).get() > before)
                .await
        );
        assert_eq!(*watched.get(), "second", "a bad reload must keep the old value");

        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "third").unwrap();
        assert!(eventually(|| *watched.get() == "third").await);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_at_start_names_the_secret_and_the_path() {
        let error =
            watch("auth.tokens_file", vec![PathBuf::from("/nonexistent/keel")], DEFAULT_POLL_INTERVAL, parse_text)
                .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("auth.tokens_file") && message.contains("/nonexistent/keel"), "{message}");
    }
}
