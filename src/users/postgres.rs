//! [`PgStore`]: the users in PostgreSQL, shared by every replica.
//!
//! - Queries are checked at runtime (no database is needed to build) and
//!   run in a transaction whose `statement_timeout` is the smaller of
//!   `database.statement_timeout` and the call's remaining deadline: sqlx
//!   cannot send PostgreSQL's cancel request, so dropping a future alone
//!   would leave the query running.
//! - Every change writes its event to the `user_events` outbox in the same
//!   transaction and NOTIFYs its sequence number. One listener per process
//!   reads the events in commit order and feeds the local subscribers, so a
//!   watch on any replica sees the writes of all of them. When the listener
//!   loses its connection, events may have been missed: the feed is closed
//!   (open watches end with UNAVAILABLE, so clients re-list and re-watch)
//!   and reopened once the listener is back.
//! - Driver errors are mapped to [`StoreError`] in one place,
//!   [`store_error`]; the cause is logged, never sent to the client.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::store::{Store, StoreError};
use super::validation::FieldViolation;
use crate::config::DatabaseSettings;
use crate::database::{Database, PoolMetrics};
use crate::grpc::middleware::deadline::current_deadline;
use crate::proto::user::v1::{User, UserEvent, user_event::Kind};

/// The NOTIFY channel of the outbox; the payload is the event's `seq`.
const CHANNEL: &str = "keel_user_events";
/// How long outbox rows are kept: far longer than a listener needs to read
/// one, short enough that the table stays small.
const OUTBOX_RETENTION_SECS: f64 = 300.0;
/// How often the outbox is trimmed.
const TRIM_EVERY: Duration = Duration::from_secs(60);
/// The listener's reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The local end of the shared change feed: the sender subscribers are
/// handed, or none while the listener is disconnected.
struct Feed {
    sender: Mutex<Option<broadcast::Sender<UserEvent>>>,
    capacity: usize,
}

impl Feed {
    fn open(&self) {
        let (sender, _) = broadcast::channel(self.capacity);
        *self.sender.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    }

    /// Ends every subscription: events may have been missed.
    fn close(&self) {
        self.sender.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    fn send(&self, event: UserEvent) {
        if let Some(sender) = self.sender.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            // No subscribers is not an error.
            let _ = sender.send(event);
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<UserEvent> {
        match self.sender.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            Some(sender) => sender.subscribe(),
            // A receiver that is closed at once: the watch ends UNAVAILABLE.
            None => broadcast::channel(1).1,
        }
    }
}

/// Users in PostgreSQL; see the module docs.
pub struct PgStore {
    database: Database,
    /// The upper bound of every statement.
    statement_timeout: Duration,
    feed: Arc<Feed>,
}

impl PgStore {
    /// The store over the app's pool, with its listener and outbox trimmer
    /// running until the pool is closed at shutdown. `watch_buffer` bounds
    /// how far a subscriber may lag.
    pub fn start(database: &Database, settings: &DatabaseSettings, watch_buffer: usize) -> Self {
        let feed = Arc::new(Feed { sender: Mutex::new(None), capacity: watch_buffer.max(1) });
        tokio::spawn(listen(database.pool().clone(), feed.clone()));
        tokio::spawn(trim_outbox(database.pool().clone()));
        Self { database: database.clone(), statement_timeout: settings.statement_timeout, feed }
    }

    /// True while the change feed is connected, so subscribers get events
    /// (tests wait for it before they watch).
    pub fn feed_connected(&self) -> bool {
        self.feed.sender.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    fn metrics(&self) -> &PoolMetrics {
        self.database.metrics()
    }

    /// A transaction bounded by the call's remaining deadline (and by
    /// `database.statement_timeout`). An expired deadline fails here,
    /// before anything is sent.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        let mut bound = self.statement_timeout;
        if let Some(deadline) = current_deadline() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::DeadlineExceeded);
            }
            bound = bound.min(left);
        }
        // At least 1 ms: 0 would mean no timeout at all.
        let millis = bound.as_millis().clamp(1, i32::MAX as u128);
        let started = Instant::now();
        let begun = self.database.pool().begin_with(format!("BEGIN; SET LOCAL statement_timeout = {millis}")).await;
        self.metrics().record(started.elapsed(), matches!(begun, Err(sqlx::Error::PoolTimedOut)));
        begun.map_err(|e| store_error(e, "begin"))
    }
}

/// Maps a driver error, in the one place it is done, and logs its cause.
/// Nothing of the driver's text reaches the client.
pub(crate) fn store_error(error: sqlx::Error, operation: &'static str) -> StoreError {
    use sqlx::Error as E;
    let unavailable = |what: &str| {
        warn!(error = %error, operation, "database unavailable");
        StoreError::Unavailable(what.to_owned())
    };
    match &error {
        E::PoolTimedOut => unavailable("no database connection free within database.acquire_timeout"),
        E::PoolClosed | E::WorkerCrashed => unavailable("database pool closed"),
        E::Io(_) | E::Tls(_) | E::Protocol(_) => unavailable("database unreachable"),
        E::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                "57014" => {
                    debug!(error = %error, operation, "statement timeout");
                    StoreError::DeadlineExceeded
                }
                "57P01" | "57P02" | "57P03" => unavailable("database shutting down or starting"),
                c if c.starts_with("08") => unavailable("database connection failed"),
                // Too many connections, out of memory or disk: transient.
                "53300" | "53200" | "53100" => unavailable("database overloaded"),
                _ => internal(&error, operation),
            }
        }
        _ => internal(&error, operation),
    }
}

fn internal(error: &sqlx::Error, operation: &'static str) -> StoreError {
    tracing::error!(error = %error, operation, "database error");
    StoreError::Internal
}

/// A unique violation, for the one insert that can raise it.
fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

fn micros(time: Option<&prost_types::Timestamp>) -> i64 {
    time.map_or(0, |t| t.seconds.saturating_mul(1_000_000).saturating_add(i64::from(t.nanos / 1000)))
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// The columns a user is read with; timestamps as epoch microseconds, so
/// no date-time crate is needed.
const COLUMNS: &str = "user_id, display_name, email, roles, \
    (extract(epoch from create_time) * 1000000)::int8 AS create_us, \
    (extract(epoch from update_time) * 1000000)::int8 AS update_us";

fn user_of(row: &PgRow) -> Result<User, sqlx::Error> {
    Ok(User {
        user_id: row.try_get("user_id")?,
        display_name: row.try_get("display_name")?,
        email: row.try_get("email")?,
        roles: row.try_get("roles")?,
        create_time: Some(timestamp(row.try_get("create_us")?)),
        update_time: Some(timestamp(row.try_get("update_us")?)),
    })
}

/// Timestamps as PostgreSQL will return them (microseconds), so what a
/// write returns is what later reads return.
fn truncated(mut user: User) -> User {
    user.create_time = user.create_time.map(|t| timestamp(micros(Some(&t))));
    user.update_time = user.update_time.map(|t| timestamp(micros(Some(&t))));
    user
}

/// Writes `event` to the outbox and notifies its seq, in `tx`.
async fn publish(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    kind: Kind,
    user: &User,
) -> Result<(), sqlx::Error> {
    let payload = UserEvent { kind: kind as i32, user: Some(user.clone()) }.encode_to_vec();
    sqlx::query(
        "WITH e AS (INSERT INTO user_events (payload) VALUES ($1) RETURNING seq) \
         SELECT pg_notify($2, seq::text) FROM e",
    )
    .bind(payload)
    .bind(CHANNEL)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The SQL for a timestamp from the epoch microseconds in parameter `$n`.
fn to_ts(n: u8) -> String {
    format!("('epoch'::timestamptz + ${n}::int8 * interval '1 microsecond')")
}

impl Store for PgStore {
    async fn ready(&self) -> Result<(), StoreError> {
        self.database.ping().await.map_err(StoreError::Unavailable)
    }

    async fn create(&self, user: User) -> Result<User, StoreError> {
        let user = truncated(user);
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO users (user_id, display_name, email, roles, create_time, update_time) \
             VALUES ($2, $3, $4, $5, {}, {})",
            to_ts(1),
            to_ts(6)
        ))
        .bind(micros(user.create_time.as_ref()))
        .bind(&user.user_id)
        .bind(&user.display_name)
        .bind(&user.email)
        .bind(&user.roles)
        .bind(micros(user.update_time.as_ref()))
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => return Err(StoreError::AlreadyExists(user.user_id)),
            Err(error) => return Err(store_error(error, "create")),
        }
        publish(&mut tx, Kind::Created, &user).await.map_err(|e| store_error(e, "create"))?;
        tx.commit().await.map_err(|e| store_error(e, "create"))?;
        Ok(user)
    }

    async fn get(&self, user_id: &str) -> Result<User, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE user_id = $1"))
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| store_error(e, "get"))?;
        tx.commit().await.map_err(|e| store_error(e, "get"))?;
        let row = row.ok_or_else(|| StoreError::NotFound(user_id.to_owned()))?;
        user_of(&row).map_err(|e| store_error(e, "get"))
    }

    async fn update<F>(&self, user_id: &str, change: F) -> Result<User, StoreError>
    where
        F: FnOnce(&User) -> Result<User, FieldViolation> + Send,
    {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE user_id = $1 FOR UPDATE"))
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| store_error(e, "update"))?;
        let row = row.ok_or_else(|| StoreError::NotFound(user_id.to_owned()))?;
        let existing = user_of(&row).map_err(|e| store_error(e, "update"))?;
        let updated = truncated(change(&existing)?);
        sqlx::query(&format!(
            "UPDATE users SET display_name = $2, email = $3, roles = $4, create_time = {}, update_time = {} \
             WHERE user_id = $6",
            to_ts(5),
            to_ts(1)
        ))
        .bind(micros(updated.update_time.as_ref()))
        .bind(&updated.display_name)
        .bind(&updated.email)
        .bind(&updated.roles)
        .bind(micros(updated.create_time.as_ref()))
        .bind(user_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| store_error(e, "update"))?;
        publish(&mut tx, Kind::Updated, &updated).await.map_err(|e| store_error(e, "update"))?;
        tx.commit().await.map_err(|e| store_error(e, "update"))?;
        Ok(updated)
    }

    async fn delete(&self, user_id: &str) -> Result<User, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!("DELETE FROM users WHERE user_id = $1 RETURNING {COLUMNS}"))
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| store_error(e, "delete"))?;
        let row = row.ok_or_else(|| StoreError::NotFound(user_id.to_owned()))?;
        let removed = user_of(&row).map_err(|e| store_error(e, "delete"))?;
        publish(&mut tx, Kind::Deleted, &removed).await.map_err(|e| store_error(e, "delete"))?;
        tx.commit().await.map_err(|e| store_error(e, "delete"))?;
        Ok(removed)
    }

    async fn list_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<User>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut tx = self.begin().await?;
        // Keyset pagination over the primary key (COLLATE "C": byte order).
        let rows = match after {
            Some(after) => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE user_id > $1 ORDER BY user_id LIMIT $2"))
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await
            }
            None => {
                sqlx::query(&format!("SELECT {COLUMNS} FROM users ORDER BY user_id LIMIT $1"))
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await
            }
        }
        .map_err(|e| store_error(e, "list"))?;
        tx.commit().await.map_err(|e| store_error(e, "list"))?;
        rows.iter().map(user_of).collect::<Result<_, _>>().map_err(|e| store_error(e, "list"))
    }

    fn subscribe(&self) -> broadcast::Receiver<UserEvent> {
        self.feed.subscribe()
    }
}

/// Sleeps for `delay` unless the pool closes first; false when it did.
async fn pause(delay: Duration, pool: &PgPool) -> bool {
    tokio::select! {
        () = pool.close_event() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// The process's one listener: LISTEN, then read each notified event from
/// the outbox and hand it to the local subscribers, in commit order. On a
/// lost connection the feed is closed and the listener reconnects with
/// backoff; the feed reopens once it listens again.
async fn listen(pool: PgPool, feed: Arc<Feed>) {
    let mut backoff = BACKOFF_MIN;
    let mut lost = false;
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = pool.close_event() => return,
            connected = connected => match connected {
                Ok(listener) => listener,
                Err(error) => {
                    debug!(error = %error, retry_in = ?backoff, "change feed: cannot listen");
                    if !pause(backoff, &pool).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        feed.open();
        backoff = BACKOFF_MIN;
        if lost {
            info!("change feed: listening again");
        }
        lost = true;
        let reason = loop {
            let notification = tokio::select! {
                () = pool.close_event() => {
                    feed.close();
                    return;
                }
                notification = listener.try_recv() => notification,
            };
            let seq = match notification {
                Ok(Some(notification)) => notification.payload().parse::<i64>().ok(),
                Ok(None) => break "connection lost".to_owned(),
                Err(error) => break format!("{error}"),
            };
            let Some(seq) = seq else { continue };
            match fetch_event(&pool, seq).await {
                Ok(Some(event)) => feed.send(event),
                // Trimmed already: only after a very long stall.
                Ok(None) => break format!("event {seq} no longer in the outbox"),
                Err(error) => break format!("cannot read event {seq}: {error}"),
            }
        };
        warn!(reason, "change feed lost: open watches end with UNAVAILABLE; reconnecting");
        feed.close();
        drop(listener);
        if !pause(backoff, &pool).await {
            return;
        }
    }
}

async fn fetch_event(pool: &PgPool, seq: i64) -> Result<Option<UserEvent>, sqlx::Error> {
    let row = sqlx::query("SELECT payload FROM user_events WHERE seq = $1").bind(seq).fetch_optional(pool).await?;
    let Some(row) = row else { return Ok(None) };
    let payload: Vec<u8> = row.try_get("payload")?;
    UserEvent::decode(payload.as_slice()).map(Some).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Deletes outbox rows older than the retention, every [`TRIM_EVERY`].
async fn trim_outbox(pool: PgPool) {
    while pause(TRIM_EVERY, &pool).await {
        let trimmed = sqlx::query("DELETE FROM user_events WHERE created_at < now() - make_interval(secs => $1)")
            .bind(OUTBOX_RETENTION_SECS)
            .execute(&pool)
            .await;
        match trimmed {
            Ok(done) => debug!(rows = done.rows_affected(), "outbox trimmed"),
            Err(error) => debug!(error = %error, "outbox trim failed; retrying later"),
        }
    }
}
