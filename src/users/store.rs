//! Persistence for users: the [`Store`] trait the service is written against,
//! and [`MemoryStore`], the embedded default so `cargo run` needs nothing.
//!
//! A store also publishes a [`UserEvent`] for every change, in the order the
//! changes were applied; WatchUsers is built on that feed.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{PoisonError, RwLock};

use tokio::sync::broadcast;

use super::validation::FieldViolation;
use crate::proto::user::v1::{User, UserEvent, user_event::Kind};

/// What can go wrong in a store, independent of the wire.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("user {0:?} not found")]
    NotFound(String),
    #[error("user {0:?} already exists")]
    AlreadyExists(String),
    #[error(transparent)]
    Invalid(#[from] FieldViolation),
    /// The backend cannot be reached or is overloaded; retrying may help.
    /// The text says what failed, never the driver's own message.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The call's deadline (or the statement bound) ran out in the backend.
    #[error("the store did not answer within the deadline")]
    DeadlineExceeded,
    /// Anything else; the cause was logged where it happened.
    #[error("internal store error")]
    Internal,
}

/// The operations the user service needs. Implement it for a database to
/// replace the in-memory default.
pub trait Store: Send + Sync + 'static {
    /// Whether the backend can serve now; readiness follows it. The
    /// in-memory store always can.
    fn ready(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Inserts a new user; fails if the id is taken.
    fn create(&self, user: User) -> impl Future<Output = Result<User, StoreError>> + Send;

    fn get(&self, user_id: &str) -> impl Future<Output = Result<User, StoreError>> + Send;

    /// Replaces a user with what `change` makes of it, atomically.
    fn update<F>(&self, user_id: &str, change: F) -> impl Future<Output = Result<User, StoreError>> + Send
    where
        F: FnOnce(&User) -> Result<User, FieldViolation> + Send;

    /// Removes a user and returns it as it was.
    fn delete(&self, user_id: &str) -> impl Future<Output = Result<User, StoreError>> + Send;

    /// Up to `limit` users with ids greater than `after`, ordered by id.
    /// Paging keeps a long listing from holding the whole table in memory.
    fn list_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<User>, StoreError>> + Send;

    /// A feed of the changes made from now on.
    fn subscribe(&self) -> broadcast::Receiver<UserEvent>;
}

/// Users in a `BTreeMap`, so listing by id order is a range scan.
#[derive(Debug)]
pub struct MemoryStore {
    users: RwLock<BTreeMap<String, User>>,
    events: broadcast::Sender<UserEvent>,
}

impl MemoryStore {
    /// `event_capacity` bounds how far the slowest subscriber may lag before
    /// it misses events (and is then told so).
    pub fn new(event_capacity: usize) -> Self {
        let (events, _) = broadcast::channel(event_capacity.max(1));
        Self { users: RwLock::new(BTreeMap::new()), events }
    }

    /// Publishes under the write lock so events are in the order of changes.
    fn publish(&self, kind: Kind, user: &User) {
        // No subscribers is not an error.
        let _ = self.events.send(UserEvent { kind: kind as i32, user: Some(user.clone()) });
    }
}

impl Store for MemoryStore {
    async fn create(&self, user: User) -> Result<User, StoreError> {
        // A poisoned lock only means a panic elsewhere mid-operation; the map
        // itself is always left consistent, so keep serving.
        let mut users = self.users.write().unwrap_or_else(PoisonError::into_inner);
        if users.contains_key(&user.user_id) {
            return Err(StoreError::AlreadyExists(user.user_id));
        }
        users.insert(user.user_id.clone(), user.clone());
        self.publish(Kind::Created, &user);
        Ok(user)
    }

    async fn get(&self, user_id: &str) -> Result<User, StoreError> {
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        users.get(user_id).cloned().ok_or_else(|| StoreError::NotFound(user_id.to_owned()))
    }

    async fn update<F>(&self, user_id: &str, change: F) -> Result<User, StoreError>
    where
        F: FnOnce(&User) -> Result<User, FieldViolation> + Send,
    {
        let mut users = self.users.write().unwrap_or_else(PoisonError::into_inner);
        let slot = users.get_mut(user_id).ok_or_else(|| StoreError::NotFound(user_id.to_owned()))?;
        let updated = change(slot)?;
        slot.clone_from(&updated);
        self.publish(Kind::Updated, &updated);
        Ok(updated)
    }

    async fn delete(&self, user_id: &str) -> Result<User, StoreError> {
        let mut users = self.users.write().unwrap_or_else(PoisonError::into_inner);
        let removed = users.remove(user_id).ok_or_else(|| StoreError::NotFound(user_id.to_owned()))?;
        self.publish(Kind::Deleted, &removed);
        Ok(removed)
    }

    async fn list_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<User>, StoreError> {
        use std::ops::Bound;
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        let lower = after.map_or(Bound::Unbounded, |id| Bound::Excluded(id.to_owned()));
        Ok(users.range((lower, Bound::Unbounded)).take(limit).map(|(_, u)| u.clone()).collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<UserEvent> {
        self.events.subscribe()
    }
}
