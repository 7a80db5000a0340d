//! The bare gRPC baseline of `scripts/bench`: `user.v1.UserService` on a
//! plain tonic server over the same [`MemoryStore`] keel uses, with no
//! layers at all (no auth, metrics, request ids, logging, limits or
//! deadlines). Whatever keel costs above this is the price of its layers.
//!
//! Built only with `--features bench-bare`. Usage: `bare-grpc [ADDR]`
//! (default `127.0.0.1:9100`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use keel::proto::user::v1::user_service_server::{UserService, UserServiceServer};
use keel::proto::user::v1::{
    CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRequest, User, UserEvent,
    WatchUsersRequest,
};
use keel::users::store::{MemoryStore, Store, StoreError};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Users per store read, as in keel's ListUsers.
const LIST_PAGE: usize = 100;
/// Messages a stream may queue ahead of the client: keel's `streams.buffer`.
const STREAM_BUFFER: usize = 16;
/// The change feed's capacity: keel's `streams.watch_buffer`.
const WATCH_BUFFER: usize = 256;

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

struct Bare {
    store: Arc<MemoryStore>,
}

fn status(error: StoreError) -> Status {
    match error {
        StoreError::NotFound(_) => Status::not_found(error.to_string()),
        StoreError::AlreadyExists(_) => Status::already_exists(error.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(error.to_string()),
        StoreError::Unavailable(_) => Status::unavailable(error.to_string()),
        StoreError::DeadlineExceeded => Status::deadline_exceeded(error.to_string()),
        StoreError::Internal => Status::internal(error.to_string()),
    }
}

#[tonic::async_trait]
impl UserService for Bare {
    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        // Stamped and checked as keel's service does (the example
        // service's own logic, not a layer), so both servers store and send
        // the same users: with no timestamps, every bare response was two
        // fields shorter than keel's.
        let user = request.into_inner().user.unwrap_or_default();
        let user = keel::users::validation::new_user(user, SystemTime::now())
            .map_err(|violation| Status::invalid_argument(violation.to_string()))?;
        self.store.create(user).await.map(Response::new).map_err(status)
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        self.store.get(&request.into_inner().user_id).await.map(Response::new).map_err(status)
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        // A bare replace of the mutable fields; the mask is not read.
        let patch = request.into_inner().user.unwrap_or_default();
        let updated = self
            .store
            .update(&patch.user_id.clone(), |existing| {
                let mut user = existing.clone();
                user.display_name = patch.display_name;
                user.email = patch.email;
                user.roles = patch.roles;
                user.update_time = Some(SystemTime::now().into());
                Ok(user)
            })
            .await
            .map_err(status)?;
        Ok(Response::new(updated))
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Result<Response<()>, Status> {
        self.store.delete(&request.into_inner().user_id).await.map_err(status)?;
        Ok(Response::new(()))
    }

    type ListUsersStream = Stream<User>;

    async fn list_users(&self, _: Request<ListUsersRequest>) -> Result<Response<Self::ListUsersStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut after: Option<String> = None;
            loop {
                let page = match store.list_after(after.as_deref(), LIST_PAGE).await {
                    Ok(page) => page,
                    Err(error) => {
                        let _ = tx.send(Err(status(error))).await;
                        return;
                    }
                };
                let full = page.len() == LIST_PAGE;
                after = page.last().map(|u| u.user_id.clone());
                for user in page {
                    // A failed send means the client is gone: stop.
                    if tx.send(Ok(user)).await.is_err() {
                        return;
                    }
                }
                if !full {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchUsersStream = Stream<UserEvent>;

    async fn watch_users(&self, _: Request<WatchUsersRequest>) -> Result<Response<Self::WatchUsersStream>, Status> {
        let mut events = self.store.subscribe();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            loop {
                let item = match events.recv().await {
                    Ok(event) => Ok(event),
                    Err(broadcast::error::RecvError::Lagged(_)) => Err(Status::resource_exhausted("too slow")),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let last = item.is_err();
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tokio::main]
async fn main() {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9100".to_owned());
    let addr: SocketAddr = match arg.parse() {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("bare-grpc: bad address {arg:?}: {error}");
            std::process::exit(64);
        }
    };
    let service = Bare { store: Arc::new(MemoryStore::new(WATCH_BUFFER)) };
    let served = tonic::transport::Server::builder().add_service(UserServiceServer::new(service)).serve(addr).await;
    if let Err(error) = served {
        eprintln!("bare-grpc: {error}");
        std::process::exit(1);
    }
}
