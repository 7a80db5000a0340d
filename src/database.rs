//! The database component: a PostgreSQL pool over `database.*`, built by
//! [`App`](crate::app::App) when `database.url` is set, handed to services
//! through the `ServiceContext`, measured (`keel_db_pool_*`), checked by
//! readiness (`database`), and closed after the servers have drained.
//!
//! The embedded migrations (`migrations/`) are run by `keel migrate`, or
//! before serving with `database.migrate_on_start`.
//!
//! With `database.url_file` the URL is watched through
//! [`crate::secret_file`]: a rotated Secret (a new password, a new host)
//! is used for every connection opened after the reload; connections
//! already open keep theirs until the pool recycles them.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::time::Instant;

use crate::config::DatabaseSettings;
use crate::health::{CheckFuture, ReadinessCheck};
use crate::metrics::{Metrics, MetricsError};

/// The migrations under `migrations/`, embedded in the binary: version,
/// description, SQL. Add a file there and a line here.
const MIGRATIONS: &[(i64, &str, &str)] = &[(1, "users", include_str!("../migrations/0001_users.sql"))];

/// How long a readiness ping may take, and how long its answer is reused
/// so that probes don't load the database.
const PING_TIMEOUT: Duration = Duration::from_millis(800);
const PING_CACHE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("invalid database.url")]
    Url(#[source] sqlx::Error),
    #[error(transparent)]
    UrlFile(#[from] crate::secret_file::SecretFileError),
    #[error("cannot run the database migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("cannot connect to the database")]
    Connect(#[source] sqlx::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// A readiness answer and when it was taken.
type Ping = (Instant, Result<(), String>);

/// The pool and what is measured about it. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    pool: PgPool,
    metrics: PoolMetrics,
    /// The last readiness answer and when it was taken.
    ping: Arc<tokio::sync::Mutex<Option<Ping>>>,
}

impl Database {
    /// The pool over `settings`, or `None` without a URL. Connects lazily,
    /// so keel starts (unready) while the database is down and becomes
    /// ready when it is up; with `migrate_on_start` it must be reachable.
    pub async fn connect(settings: &DatabaseSettings, metrics: &Metrics) -> Result<Option<Self>, DatabaseError> {
        if !settings.enabled() {
            return Ok(None);
        }
        let pool = pool(settings)?;
        if !settings.url_file.is_empty() {
            follow_url_file(&pool, settings)?;
        }
        if settings.migrate_on_start {
            migrate(&pool).await?;
            tracing::info!("database migrations applied");
        }
        let pool_metrics = PoolMetrics::new(settings)?;
        metrics.register(Box::new(PoolCollector::new(pool.clone(), settings.max_connections)?))?;
        metrics.register(Box::new(pool_metrics.acquire_seconds.clone()))?;
        metrics.register(Box::new(pool_metrics.acquire_timeouts.clone()))?;
        Ok(Some(Self { pool, metrics: pool_metrics, ping: Arc::default() }))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn metrics(&self) -> &PoolMetrics {
        &self.metrics
    }

    /// Waits for connections in use to come back, then closes them all.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A `SELECT 1` bounded by [`PING_TIMEOUT`], answered from a cache for
    /// [`PING_CACHE`].
    pub async fn ping(&self) -> Result<(), String> {
        let mut cached = self.ping.lock().await;
        if let Some((at, outcome)) = cached.as_ref()
            && at.elapsed() < PING_CACHE
        {
            return outcome.clone();
        }
        let ping = async {
            let mut conn = self.pool.acquire().await?;
            sqlx::query("SELECT 1").execute(&mut *conn).await
        };
        let outcome = match tokio::time::timeout(PING_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("database ping failed: {error}")),
            Err(_) => Err(format!("database ping: no answer within {PING_TIMEOUT:?}")),
        };
        *cached = Some((Instant::now(), outcome.clone()));
        outcome
    }
}

impl ReadinessCheck for Database {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(self.ping())
    }
}

/// The connect options of a URL, as keel connects (application name set).
fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    Ok(options.application_name(env!("CARGO_PKG_NAME")))
}

/// Watches `database.url_file` and hands every new URL to the pool, which
/// uses it for the connections it opens from then on. A file that cannot
/// be read or parsed keeps the URL in force (logged and counted by
/// `secret_file`). Ends when the pool is closed.
fn follow_url_file(pool: &PgPool, settings: &DatabaseSettings) -> Result<(), DatabaseError> {
    follow_url_file_every(pool, settings, crate::secret_file::DEFAULT_POLL_INTERVAL)
}

fn follow_url_file_every(pool: &PgPool, settings: &DatabaseSettings, interval: Duration) -> Result<(), DatabaseError> {
    let watched = crate::secret_file::watch(
        "database.url_file",
        vec![settings.url_file.clone().into()],
        interval,
        |contents: &[Vec<u8>]| {
            let url = crate::secret_file::trimmed_utf8(contents.first().map(Vec::as_slice).unwrap_or_default())?;
            // The driver's message names the part that is wrong, never the
            // URL (which holds the password).
            connect_options(&url).map_err(|error| format!("not a valid PostgreSQL URL: {error}"))
        },
    )?;
    let pool = pool.clone();
    let mut last = watched.get();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pool.is_closed() {
            ticker.tick().await;
            let current = watched.get();
            if !Arc::ptr_eq(&current, &last) {
                pool.set_connect_options((*current).clone());
                tracing::info!("database.url_file changed: new connections use the new URL");
                last = current;
            }
        }
    });
    Ok(())
}

/// A lazily connecting pool over `settings`.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, DatabaseError> {
    let options = connect_options(&settings.url).map_err(DatabaseError::Url)?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(settings.min_connections)
        .acquire_timeout(settings.acquire_timeout)
        // A connection broken by a database restart is found out here,
        // rather than failing one call per pooled connection.
        .test_before_acquire(true)
        .connect_lazy_with(options))
}

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|(version, name, sql)| {
                    Migration::new(*version, Cow::Borrowed(*name), MigrationType::Simple, Cow::Borrowed(*sql), false)
                })
                .collect())
        })
    }
}

/// Applies the embedded migrations; idempotent. Concurrent runs (two pods
/// starting with `migrate_on_start`) serialise on sqlx's advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), DatabaseError> {
    let migrator = Migrator::new(Embedded).await.map_err(DatabaseError::Migrate)?;
    migrator.run(pool).await.map_err(DatabaseError::Migrate)
}

/// `keel migrate`: connects, migrates, closes.
pub async fn migrate_url(settings: &DatabaseSettings) -> Result<(), DatabaseError> {
    let pool = pool(settings)?;
    // Fail with the connection's own error rather than a pool timeout.
    let connected = pool.acquire().await.map_err(DatabaseError::Connect).map(drop);
    let result = match connected {
        Ok(()) => migrate(&pool).await,
        Err(error) => Err(error),
    };
    pool.close().await;
    result
}

/// What stores record about their use of the pool.
#[derive(Clone)]
pub struct PoolMetrics {
    /// `keel_db_pool_acquire_seconds`: waiting for a connection.
    acquire_seconds: Histogram,
    /// `keel_db_pool_acquire_timeouts_total`: waits that gave up.
    acquire_timeouts: IntCounter,
}

impl PoolMetrics {
    fn new(settings: &DatabaseSettings) -> Result<Self, MetricsError> {
        let bound = settings.acquire_timeout.as_secs_f64();
        let mut buckets: Vec<f64> = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0]
            .into_iter()
            .filter(|b| *b < bound)
            .collect();
        buckets.push(bound);
        let acquire_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "keel_db_pool_acquire_seconds",
                "Time calls waited for a database connection (and its BEGIN).",
            )
            .buckets(buckets),
        )
        .map_err(MetricsError::from)?;
        let acquire_timeouts = IntCounter::new(
            "keel_db_pool_acquire_timeouts_total",
            "Waits for a database connection that reached database.acquire_timeout.",
        )
        .map_err(MetricsError::from)?;
        Ok(Self { acquire_seconds, acquire_timeouts })
    }

    /// Records one acquisition that took `waited`, timed out or not.
    pub fn record(&self, waited: Duration, timed_out: bool) {
        self.acquire_seconds.observe(waited.as_secs_f64());
        if timed_out {
            self.acquire_timeouts.inc();
        }
    }
}

/// `keel_db_pool_connections{state="idle|in_use"}` and
/// `keel_db_pool_max_connections`, read from the pool at scrape time.
struct PoolCollector {
    pool: PgPool,
    connections: IntGaugeVec,
    max: prometheus::IntGauge,
    descs: Vec<Desc>,
}

impl PoolCollector {
    fn new(pool: PgPool, max_connections: u32) -> Result<Self, MetricsError> {
        let connections =
            IntGaugeVec::new(Opts::new("keel_db_pool_connections", "Open database connections, by state."), &["state"])
                .map_err(MetricsError::from)?;
        let max = prometheus::IntGauge::new("keel_db_pool_max_connections", "database.max_connections.")
            .map_err(MetricsError::from)?;
        max.set(i64::from(max_connections));
        let descs = connections.desc().into_iter().chain(max.desc()).cloned().collect();
        Ok(Self { pool, connections, max, descs })
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let size = i64::from(self.pool.size());
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(i64::MAX);
        self.connections.with_label_values(&["idle"]).set(idle);
        self.connections.with_label_values(&["in_use"]).set((size - idle).max(0));
        let mut out = self.connections.collect();
        out.extend(self.max.collect());
        out
    }
}

#[cfg(test)]
mod url_file_tests {
    use super::*;

    #[tokio::test]
    async fn a_rotated_url_file_reaches_the_pools_new_connections() {
        let path = std::env::temp_dir().join(format!("keel-db-url-{}", std::process::id()));
        std::fs::write(&path, "postgres://keel:old@db-one:5432/keel\n").unwrap();
        let settings = DatabaseSettings {
            url: "postgres://keel:old@db-one:5432/keel".into(),
            url_file: path.display().to_string(),
            ..DatabaseSettings::default()
        };
        // Lazy: nothing connects, the options are what the pool would use.
        let pool = pool(&settings).unwrap();
        follow_url_file_every(&pool, &settings, Duration::from_millis(20)).unwrap();
        assert_eq!(pool.connect_options().get_host(), "db-one");

        let staged = path.with_extension("new");
        std::fs::write(&staged, "postgres://keel:new@db-two:5432/keel").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        let mut seen = false;
        for _ in 0..500 {
            if pool.connect_options().get_host() == "db-two" {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen, "the pool never took the new URL");

        // Not a URL: the one in force stays, and the failure is counted.
        let errors = || {
            crate::secret_file::reloads_collector()
                .map_or(0, |c| c.with_label_values(&["database.url_file", "error"]).get())
        };
        let before = errors();
        std::fs::write(&path, "not a url at all").unwrap();
        let mut counted = false;
        for _ in 0..500 {
            if errors() > before {
                counted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(counted, "the failed reload was never counted");
        assert_eq!(pool.connect_options().get_host(), "db-two", "a bad file keeps the URL in force");
        pool.close().await;
        std::fs::remove_file(&path).unwrap();
    }
}
