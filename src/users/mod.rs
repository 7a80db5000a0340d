//! The example service, `user.v1.UserService`: the part a team replaces.
//!
//! Handlers translate between the wire and the domain ([`validation`]) and
//! the persistence ([`store`]); streams run on the shared stream plumbing.

pub mod postgres;
pub mod store;
pub mod validation;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::grpc::middleware::deadline::deadline_of;
use crate::grpc::stream::{ResponseStream, StreamKind, StreamSink, StreamSpawner};
use crate::health::{CheckFuture, ReadinessCheck};
use crate::proto::user::v1::user_service_server::{UserService, UserServiceServer};
use crate::proto::user::v1::{
    CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRequest, User, UserEvent,
    WatchUsersRequest,
};
use crate::registry::{ServiceContext, ServiceOptions, ServiceRegistry, SetupError};
use postgres::PgStore;
use store::{MemoryStore, Store, StoreError};
use validation::FieldViolation;

/// How many users ListUsers reads from the store at a time.
const LIST_PAGE: usize = 100;

/// Serves `user.v1.UserService` over PostgreSQL when `database.url` is
/// set, else over the in-memory store, with readiness following the store.
pub fn register(services: &mut ServiceRegistry, ctx: &ServiceContext<'_>) -> Result<(), SetupError> {
    let watch_buffer = ctx.settings.streams.watch_buffer;
    match ctx.database {
        // The app registers the pool's readiness check, `database`.
        Some(database) => {
            let store = Arc::new(PgStore::start(database, &ctx.settings.database, watch_buffer));
            serve(services, store, ctx).depends_on("database");
        }
        None => {
            let store = Arc::new(MemoryStore::new(watch_buffer));
            services.require_ready("user-store", Arc::new(StoreReadiness(store.clone())));
            serve(services, store, ctx);
        }
    }
    Ok(())
}

fn serve<'r, S: Store>(
    services: &'r mut ServiceRegistry,
    store: Arc<S>,
    ctx: &ServiceContext<'_>,
) -> ServiceOptions<'r> {
    let users = Users::new(store, ctx.streams.clone(), ctx.settings.streams.watch_buffer)
        .with_watch_buffer_bytes(ctx.settings.streams.watch_buffer_bytes.0);
    // The layer stack enforces grpc.max_*_message_size for every service;
    // lift tonic's own 4 MiB default so it never cuts in first.
    services
        .add(UserServiceServer::new(users).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX))
}

/// Readiness follows the store: a database that cannot be reached makes
/// the pod unready rather than failing every call.
struct StoreReadiness<S>(Arc<S>);

impl<S: Store> ReadinessCheck for StoreReadiness<S> {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move { self.0.ready().await.map_err(|error| error.to_string()) })
    }
}

/// `user.v1.UserService` over any [`Store`].
pub struct Users<S> {
    store: Arc<S>,
    streams: StreamSpawner,
    /// How many events a watcher may fall behind before it is dropped.
    watch_buffer: usize,
    /// The same bound in encoded bytes.
    watch_buffer_bytes: usize,
}

impl<S: Store> Users<S> {
    pub fn new(store: Arc<S>, streams: StreamSpawner, watch_buffer: usize) -> Self {
        Self { store, streams, watch_buffer: watch_buffer.max(1), watch_buffer_bytes: usize::MAX }
    }

    /// Bounds each watcher's queue in bytes too.
    pub fn with_watch_buffer_bytes(mut self, bytes: usize) -> Self {
        self.watch_buffer_bytes = bytes.max(1);
        self
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(_) => Status::not_found(error.to_string()),
            StoreError::AlreadyExists(_) => Status::already_exists(error.to_string()),
            StoreError::Invalid(violation) => violation.into(),
            StoreError::Unavailable(_) => Status::unavailable(error.to_string()),
            StoreError::DeadlineExceeded => Status::deadline_exceeded(error.to_string()),
            StoreError::Internal => Status::internal(error.to_string()),
        }
    }
}

impl From<FieldViolation> for Status {
    fn from(violation: FieldViolation) -> Self {
        Status::invalid_argument(violation.to_string())
    }
}

#[tonic::async_trait]
impl<S: Store> UserService for Users<S> {
    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        let user = request.into_inner().user.unwrap_or_default();
        let user = validation::new_user(user, SystemTime::now())?;
        Ok(Response::new(self.store.create(user).await?))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let GetUserRequest { user_id } = request.into_inner();
        validation::check_user_id(&user_id, "user_id")?;
        Ok(Response::new(self.store.get(&user_id).await?))
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        let UpdateUserRequest { user, update_mask } = request.into_inner();
        let patch = user.unwrap_or_default();
        validation::check_user_id(&patch.user_id, "user.user_id")?;
        let updated = self
            .store
            .update(&patch.user_id, |existing| {
                validation::apply_update(existing, &patch, update_mask.as_ref(), SystemTime::now())
            })
            .await?;
        Ok(Response::new(updated))
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Result<Response<()>, Status> {
        let DeleteUserRequest { user_id } = request.into_inner();
        validation::check_user_id(&user_id, "user_id")?;
        self.store.delete(&user_id).await?;
        Ok(Response::new(()))
    }

    type ListUsersStream = ResponseStream<User>;

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<Self::ListUsersStream>, Status> {
        let deadline = deadline_of(&request);
        let store = self.store.clone();
        let stream = self.streams.spawn(StreamKind::Finite, deadline, move |sink| list_all(store, sink));
        Ok(Response::new(stream))
    }

    type WatchUsersStream = ResponseStream<UserEvent>;

    async fn watch_users(
        &self,
        request: Request<WatchUsersRequest>,
    ) -> Result<Response<Self::WatchUsersStream>, Status> {
        let deadline = deadline_of(&request);
        // Subscribe before answering, so every change after the call starts
        // is seen.
        let events = self.store.subscribe();
        let limit = WatchLimit { events: self.watch_buffer, bytes: self.watch_buffer_bytes };
        let stream = self.streams.spawn(StreamKind::Endless, deadline, move |sink| watch(events, limit, sink));
        Ok(Response::new(stream))
    }
}

/// Streams every user in id order, a page at a time.
async fn list_all<S: Store>(store: Arc<S>, sink: StreamSink<User>) -> Result<(), Status> {
    let mut after: Option<String> = None;
    loop {
        let page = store.list_after(after.as_deref(), LIST_PAGE).await?;
        let full = page.len() == LIST_PAGE;
        after = page.last().map(|u| u.user_id.clone());
        for user in page {
            sink.send(user).await?;
        }
        if !full {
            return Ok(());
        }
    }
}

/// How far a watcher may fall behind: in events and in encoded bytes.
#[derive(Clone, Copy, Debug)]
struct WatchLimit {
    events: usize,
    bytes: usize,
}

/// Forwards change events until the client, the deadline or shutdown ends
/// the stream. Events wait in a queue of at most `limit` while the client is
/// slow; a client that falls further behind is cut off rather than buffered
/// for without bound.
async fn watch(
    mut events: tokio::sync::broadcast::Receiver<UserEvent>,
    limit: WatchLimit,
    sink: StreamSink<UserEvent>,
) -> Result<(), Status> {
    let too_slow =
        || Status::resource_exhausted("subscriber too slow: fell more than streams.watch_buffer events behind");
    let too_large = || {
        Status::resource_exhausted("subscriber too slow: fell more than streams.watch_buffer_bytes of events behind")
    };
    let mut pending: VecDeque<UserEvent> = VecDeque::new();
    let mut pending_bytes = 0usize;
    loop {
        tokio::select! {
            biased;
            end = sink.stopped() => return Err(end.into()),
            slot = sink.reserve(), if !pending.is_empty() => {
                let slot = slot?;
                if let Some(event) = pending.pop_front() {
                    pending_bytes = pending_bytes.saturating_sub(prost::Message::encoded_len(&event));
                    slot.send(Ok(event));
                }
            }
            received = events.recv() => match received {
                Ok(event) => {
                    pending_bytes += prost::Message::encoded_len(&event);
                    pending.push_back(event);
                    if pending.len() > limit.events {
                        return Err(too_slow());
                    }
                    if pending_bytes > limit.bytes {
                        return Err(too_large());
                    }
                }
                Err(RecvError::Lagged(_)) => return Err(too_slow()),
                Err(RecvError::Closed) => return Err(Status::unavailable(
                    "change feed lost: events may have been missed; list again and watch again",
                )),
            },
        }
    }
}
