//! The database component: a PostgreSQL pool over `database.*`, built by
//! [`App`](crate::app::App) when `database.url` is set, handed to services
//! through the `ServiceContext`, measured (`keel_db_pool_*`), checked by
//! readiness (`database`), and closed after the servers have drained.
//!
//! The embedded migrations (`migrations/`) are run by `keel migrate`, or
//! before serving with `database.migrate_on_start`.

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

/// A lazily connecting pool over `settings`.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, DatabaseError> {
    let options: PgConnectOptions = settings.url.parse().map_err(DatabaseError::Url)?;
    let options = options.application_name(env!("CARGO_PKG_NAME"));
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
