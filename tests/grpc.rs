//! The gRPC face of keel over real sockets: health, reflection, every RPC and
//! its errors, and the behaviour of streams under cancellation, slowness and
//! deadlines.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use keel::proto::user::v1::user_event::Kind;
use keel::proto::user::v1::{
    CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRequest, User, WatchUsersRequest,
};
use prost_types::FieldMask;
use support::{READY_BOUND, eventually, spawn_app, spawn_app_with};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

fn user(id: &str, name: &str, email: &str) -> User {
    User { user_id: id.into(), display_name: name.into(), email: email.into(), ..Default::default() }
}

fn create(u: User) -> CreateUserRequest {
    CreateUserRequest { user: Some(u) }
}

#[tokio::test]
async fn health_is_serving_for_the_server_and_the_user_service() -> Result<()> {
    let app = spawn_app().await?;
    let mut health = app.health()?;
    for service in ["", "user.v1.UserService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await?.into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
    assert_eq!(unknown.err().map(|s| s.code()), Some(Code::NotFound));
    app.stop().await
}

/// The health protocol: Watch of an unknown service streams
/// SERVICE_UNKNOWN and keeps watching, rather than failing.
#[tokio::test]
async fn health_watch_of_an_unknown_service_streams_service_unknown() -> Result<()> {
    let app = spawn_app().await?;
    let mut watch = app.health()?.watch(HealthCheckRequest { service: "no.such.Service".into() }).await?.into_inner();
    let first = watch.message().await?.context("no first status")?;
    assert_eq!(first.status, ServingStatus::ServiceUnknown as i32);
    // Still open: nothing more arrives until something ends it.
    let more = tokio::time::timeout(std::time::Duration::from_millis(200), watch.message()).await;
    assert!(more.is_err(), "the watch ended: {more:?}");
    drop(watch);
    app.stop().await
}

/// Health checks are never shed, but health Watch streams count against
/// the concurrency limit like every stream, so they cannot pile up.
#[tokio::test]
async fn health_watches_count_against_the_concurrency_limit() -> Result<()> {
    let app = support::spawn_app_with(|s| s.grpc.max_concurrent_requests = 2).await?;
    let mut health = app.health()?;
    let ask = || HealthCheckRequest { service: String::new() };
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut watch = health.watch(ask()).await?.into_inner();
        watch.message().await?.context("no first status")?;
        open.push(watch);
    }
    let refused = match health.watch(ask()).await {
        Ok(response) => response.into_inner().message().await.err(),
        Err(status) => Some(status),
    };
    assert_eq!(refused.map(|s| s.code()), Some(Code::ResourceExhausted));
    let check = health.check(ask()).await?.into_inner().status;
    assert_eq!(check, ServingStatus::Serving as i32, "checks are still answered");
    drop(open);
    app.stop().await
}

mod reflection {
    use super::*;

    #[tokio::test]
    async fn v1_lists_services_and_resolves_well_known_types() -> Result<()> {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

        let app = spawn_app().await?;
        let mut client = ServerReflectionClient::new(app.channel()?);
        let ask =
            |request: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(request) };
        let requests = vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol("google.protobuf.Timestamp".into())),
            ask(MessageRequest::FileContainingSymbol("google.protobuf.FieldMask".into())),
            ask(MessageRequest::FileContainingSymbol("google.protobuf.Empty".into())),
            ask(MessageRequest::FileContainingSymbol("user.v1.UserService".into())),
        ];
        let mut responses = client.server_reflection_info(tokio_stream::iter(requests)).await?.into_inner();

        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.message().await?.and_then(|r| r.message_response)
        else {
            return Err(anyhow!("expected a service list"));
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in ["user.v1.UserService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        for symbol in ["Timestamp", "FieldMask", "Empty", "UserService"] {
            match responses.message().await?.and_then(|r| r.message_response) {
                Some(MessageResponse::FileDescriptorResponse(files)) => {
                    assert!(!files.file_descriptor_proto.is_empty(), "no descriptor for {symbol}")
                }
                other => return Err(anyhow!("no descriptor for {symbol}: {other:?}")),
            }
        }
        drop(responses);
        app.stop().await
    }

    #[tokio::test]
    async fn v1alpha_lists_services_for_older_clients() -> Result<()> {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

        let app = spawn_app().await?;
        let mut client = ServerReflectionClient::new(app.channel()?);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client.server_reflection_info(tokio_stream::iter([request])).await?.into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.message().await?.and_then(|r| r.message_response)
        else {
            return Err(anyhow!("expected a service list"));
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.iter().any(|n| n == "user.v1.UserService"), "{names:?}");
        assert!(names.iter().any(|n| n == "grpc.health.v1.Health"), "{names:?}");
        assert!(names.iter().any(|n| n == "grpc.reflection.v1.ServerReflection"), "{names:?}");
        assert!(names.iter().any(|n| n == "grpc.reflection.v1alpha.ServerReflection"), "{names:?}");
        drop(responses);
        app.stop().await
    }
}

/// Reflection's bidi streams (grpcui and Evans keep one open) end like
/// every stream: at the deadline, and with UNAVAILABLE when draining begins,
/// instead of holding shutdown until its bound.
mod reflection_streams {
    use super::*;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    /// Opens a reflection stream and reads one answer; the request side
    /// stays open, as interactive clients keep it.
    async fn open(
        app: &support::TestApp,
    ) -> Result<(tokio::sync::mpsc::Sender<ServerReflectionRequest>, tonic::Streaming<ServerReflectionResponse>)> {
        let (requests, rx) = tokio::sync::mpsc::channel(4);
        let list = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        requests.send(list).await?;
        let mut client = ServerReflectionClient::new(app.channel()?);
        let mut responses =
            client.server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        responses.message().await?.context("no answer")?;
        Ok((requests, responses))
    }

    #[tokio::test]
    async fn an_open_reflection_stream_ends_unavailable_at_shutdown() -> Result<()> {
        let app = spawn_app_with(|s| s.shutdown.timeout = Duration::from_secs(30)).await?;
        let (_requests, mut responses) = open(&app).await?;
        let stopping = tokio::spawn(app.stop());
        let ended = tokio::time::timeout(READY_BOUND, responses.message()).await?;
        assert_eq!(ended.err().map(|s| s.code()), Some(Code::Unavailable));
        // The stream no longer holds the shutdown to its 30s bound.
        tokio::time::timeout(READY_BOUND, stopping).await.context("shutdown waited for the stream")???;
        Ok(())
    }

    #[tokio::test]
    async fn a_reflection_stream_ends_at_its_deadline() -> Result<()> {
        let app = spawn_app_with(|s| s.grpc.max_timeout = Duration::from_millis(300)).await?;
        let (_requests, mut responses) = open(&app).await?;
        let ended = tokio::time::timeout(READY_BOUND, responses.message()).await?;
        assert_eq!(ended.err().map(|s| s.code()), Some(Code::DeadlineExceeded));
        app.stop().await
    }
}

mod crud {
    use super::*;

    #[tokio::test]
    async fn create_then_get_round_trips_and_sets_timestamps() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        let created = users.create_user(create(user("ada", "Ada", "ada@example.com"))).await?.into_inner();
        assert_eq!(created.user_id, "ada");
        assert!(created.roles.is_empty());
        let create_time = created.create_time.context("create_time unset")?;
        assert_eq!(Some(create_time), created.update_time);
        assert!(create_time.seconds > 1_600_000_000, "create_time looks unset: {create_time:?}");

        let fetched = users.get_user(GetUserRequest { user_id: "ada".into() }).await?.into_inner();
        assert_eq!(fetched, created);
        app.stop().await
    }

    #[tokio::test]
    async fn an_empty_id_is_generated_by_the_server() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        let a = users.create_user(create(user("", "A", "a@example.com"))).await?.into_inner();
        let b = users.create_user(create(user("", "B", "b@example.com"))).await?.into_inner();
        assert!(!a.user_id.is_empty());
        assert_ne!(a.user_id, b.user_id);
        let fetched = users.get_user(GetUserRequest { user_id: a.user_id.clone() }).await?.into_inner();
        assert_eq!(fetched.display_name, "A");
        app.stop().await
    }

    #[tokio::test]
    async fn create_rejects_duplicates_and_invalid_fields() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        users.create_user(create(user("dup", "Dup", "dup@example.com"))).await?;

        let duplicate = users.create_user(create(user("dup", "Dup", "dup@example.com"))).await;
        assert_eq!(duplicate.err().map(|s| s.code()), Some(Code::AlreadyExists));

        let cases = [
            (user("x1", "", "x@example.com"), "display_name"),
            (user("x2", "   ", "x@example.com"), "display_name"),
            (user("x3", "X", "no-at-sign"), "email"),
            (user("x4", "X", ""), "email"),
            (user("bad/id", "X", "x@example.com"), "user_id"),
        ];
        for (bad, field) in cases {
            let status = users.create_user(create(bad.clone())).await.err().context("accepted an invalid user")?;
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
            assert!(status.message().contains(field), "message {:?} should name {field}", status.message());
        }
        // A missing user message is the same as an empty one.
        let status = users.create_user(CreateUserRequest { user: None }).await.err().context("accepted no user")?;
        assert_eq!(status.code(), Code::InvalidArgument);
        app.stop().await
    }

    #[tokio::test]
    async fn get_and_delete_of_unknown_ids_are_not_found() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        let get = users.get_user(GetUserRequest { user_id: "ghost".into() }).await;
        assert_eq!(get.err().map(|s| s.code()), Some(Code::NotFound));
        let delete = users.delete_user(DeleteUserRequest { user_id: "ghost".into() }).await;
        assert_eq!(delete.err().map(|s| s.code()), Some(Code::NotFound));
        let empty = users.get_user(GetUserRequest { user_id: String::new() }).await;
        assert_eq!(empty.err().map(|s| s.code()), Some(Code::InvalidArgument));
        app.stop().await
    }

    #[tokio::test]
    async fn delete_removes_the_user() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        users.create_user(create(user("gone", "Gone", "gone@example.com"))).await?;
        users.delete_user(DeleteUserRequest { user_id: "gone".into() }).await?;
        let get = users.get_user(GetUserRequest { user_id: "gone".into() }).await;
        assert_eq!(get.err().map(|s| s.code()), Some(Code::NotFound));
        let again = users.delete_user(DeleteUserRequest { user_id: "gone".into() }).await;
        assert_eq!(again.err().map(|s| s.code()), Some(Code::NotFound));
        app.stop().await
    }

    #[tokio::test]
    async fn update_changes_only_the_masked_paths() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        let mut original = user("u1", "Ada", "ada@example.com");
        original.roles = vec!["admin".into()];
        let created = users.create_user(create(original)).await?.into_inner();

        let patch = User { user_id: "u1".into(), display_name: "Bob".into(), ..Default::default() };
        let updated = users
            .update_user(UpdateUserRequest {
                user: Some(patch),
                update_mask: Some(FieldMask { paths: vec!["display_name".into()] }),
            })
            .await?
            .into_inner();
        assert_eq!(updated.display_name, "Bob");
        assert_eq!(updated.email, "ada@example.com");
        assert_eq!(updated.roles, vec!["admin".to_owned()]);
        assert_eq!(updated.create_time, created.create_time);
        let stamp = |t: Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos));
        assert!(stamp(updated.update_time) >= stamp(created.update_time));

        let stored = users.get_user(GetUserRequest { user_id: "u1".into() }).await?.into_inner();
        assert_eq!(stored, updated);
        app.stop().await
    }

    #[tokio::test]
    async fn an_empty_mask_replaces_every_mutable_field() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        let mut original = user("u2", "Ada", "ada@example.com");
        original.roles = vec!["admin".into()];
        users.create_user(create(original)).await?;

        let replacement = user("u2", "Eve", "eve@example.com");
        let updated =
            users.update_user(UpdateUserRequest { user: Some(replacement), update_mask: None }).await?.into_inner();
        assert_eq!((updated.display_name.as_str(), updated.email.as_str()), ("Eve", "eve@example.com"));
        assert!(updated.roles.is_empty(), "roles should have been cleared: {:?}", updated.roles);
        app.stop().await
    }

    #[tokio::test]
    async fn update_rejects_unknown_paths_invalid_values_and_unknown_users() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        users.create_user(create(user("u3", "Ada", "ada@example.com"))).await?;

        let unknown_path = users
            .update_user(UpdateUserRequest {
                user: Some(user("u3", "Bob", "")),
                update_mask: Some(FieldMask { paths: vec!["nickname".into()] }),
            })
            .await
            .err()
            .context("accepted an unknown mask path")?;
        assert_eq!(unknown_path.code(), Code::InvalidArgument);
        assert!(unknown_path.message().contains("nickname"), "{}", unknown_path.message());

        let bad_email = users
            .update_user(UpdateUserRequest {
                user: Some(user("u3", "", "broken")),
                update_mask: Some(FieldMask { paths: vec!["email".into()] }),
            })
            .await
            .err()
            .context("accepted an invalid email")?;
        assert_eq!(bad_email.code(), Code::InvalidArgument);
        assert!(bad_email.message().contains("email"), "{}", bad_email.message());

        let missing = users
            .update_user(UpdateUserRequest { user: Some(user("nobody", "N", "n@example.com")), update_mask: None })
            .await;
        assert_eq!(missing.err().map(|s| s.code()), Some(Code::NotFound));

        // Nothing changed after the failed updates.
        let stored = users.get_user(GetUserRequest { user_id: "u3".into() }).await?.into_inner();
        assert_eq!((stored.display_name.as_str(), stored.email.as_str()), ("Ada", "ada@example.com"));
        app.stop().await
    }
}

mod streams {
    use super::*;

    #[tokio::test]
    async fn list_users_streams_everyone_ordered_by_id() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        // More than one store page, inserted out of order.
        let mut ids: Vec<String> = (0..257).map(|i| format!("user-{:04}", (i * 7919) % 257)).collect();
        for id in &ids {
            users.create_user(create(user(id, "U", "u@example.com"))).await?;
        }
        let listed: Vec<String> = users
            .list_users(ListUsersRequest {})
            .await?
            .into_inner()
            .map(|r| r.map(|u| u.user_id))
            .collect::<Result<_, _>>()
            .await?;
        ids.sort();
        assert_eq!(listed, ids);
        app.stop().await
    }

    #[tokio::test]
    async fn watch_users_sees_each_change_after_it_starts() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        users.create_user(create(user("before", "B", "b@example.com"))).await?;

        let mut events = users.watch_users(WatchUsersRequest {}).await?.into_inner();
        users.create_user(create(user("w1", "W", "w@example.com"))).await?;
        users
            .update_user(UpdateUserRequest {
                user: Some(user("w1", "W2", "")),
                update_mask: Some(FieldMask { paths: vec!["display_name".into()] }),
            })
            .await?;
        users.delete_user(DeleteUserRequest { user_id: "w1".into() }).await?;

        let mut seen = Vec::new();
        for _ in 0..3 {
            let event = tokio::time::timeout(READY_BOUND, events.message()).await??.context("stream ended")?;
            let who = event.user.map(|u| (u.user_id, u.display_name)).unwrap_or_default();
            seen.push((Kind::try_from(event.kind)?, who));
        }
        assert_eq!(
            seen,
            vec![
                (Kind::Created, ("w1".to_owned(), "W".to_owned())),
                (Kind::Updated, ("w1".to_owned(), "W2".to_owned())),
                (Kind::Deleted, ("w1".to_owned(), "W2".to_owned())),
            ]
        );
        drop(events);
        app.stop().await
    }

    #[tokio::test]
    async fn cancelling_a_stream_stops_its_producer() -> Result<()> {
        let app = spawn_app_with(|s| s.streams.buffer = 1).await?;
        let mut users = app.users()?;
        for i in 0..300 {
            users.create_user(create(user(&format!("c{i:03}"), "C", "c@example.com"))).await?;
        }

        let mut listing = users.list_users(ListUsersRequest {}).await?.into_inner();
        assert!(listing.message().await?.is_some());
        let mut watching = users.watch_users(WatchUsersRequest {}).await?.into_inner();
        eventually(READY_BOUND, || async { app.live_streams.get() == 2 }).await.context("producers never started")?;

        drop(listing);
        eventually(READY_BOUND, || async { app.live_streams.get() == 1 })
            .await
            .context("list producer kept running")?;
        // The watch stream is still healthy after its neighbour went away.
        users.create_user(create(user("late", "L", "l@example.com"))).await?;
        assert!(watching.message().await?.is_some());
        drop(watching);
        eventually(READY_BOUND, || async { app.live_streams.get() == 0 })
            .await
            .context("watch producer kept running")?;
        app.stop().await
    }

    /// A WatchUsers stream on a connection of its own with small HTTP/2
    /// windows, so its transport buffers fill after a few dozen events and
    /// the server-side queue has to hold the rest.
    async fn slow_watcher(app: &support::TestApp) -> Result<tonic::Streaming<keel::proto::user::v1::UserEvent>> {
        let channel = app
            .endpoint()?
            .initial_stream_window_size(Some(16 * 1024))
            .initial_connection_window_size(Some(16 * 1024))
            .connect()
            .await?;
        let mut watcher = keel::proto::user::v1::user_service_client::UserServiceClient::new(channel);
        Ok(watcher.watch_users(WatchUsersRequest {}).await?.into_inner())
    }

    /// Reads until the stream fails: how many events came first, and the
    /// status it ended with. A clean end is an error here.
    async fn until_error(
        events: &mut tonic::Streaming<keel::proto::user::v1::UserEvent>,
    ) -> Result<(usize, tonic::Status)> {
        let mut delivered = 0usize;
        loop {
            match tokio::time::timeout(READY_BOUND, events.message()).await? {
                Ok(Some(_)) => delivered += 1,
                Ok(None) => return Err(anyhow!("stream ended cleanly after {delivered} events")),
                Err(status) => return Ok((delivered, status)),
            }
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_gets_resource_exhausted() -> Result<()> {
        let app = spawn_app_with(|s| {
            s.streams.buffer = 1;
            s.streams.watch_buffer = 4;
        })
        .await?;
        let mut events = slow_watcher(&app).await?;
        let mut writer = app.users()?;
        let name = "n".repeat(200);
        for i in 0..1000 {
            writer.create_user(create(user(&format!("s{i:04}"), &name, "s@example.com"))).await?;
        }
        let (delivered, status) = until_error(&mut events).await?;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("too slow"), "{}", status.message());
        assert!(delivered < 1000, "all {delivered} events were delivered");
        eventually(READY_BOUND, || async { app.live_streams.get() == 0 }).await?;
        app.stop().await
    }

    /// The watch queue is bounded in bytes too: a few large events fill it
    /// long before the event count does.
    #[tokio::test]
    async fn a_subscriber_is_bounded_in_bytes_as_well_as_events() -> Result<()> {
        let app = spawn_app_with(|s| {
            s.streams.buffer = 1;
            s.streams.watch_buffer = 10_000;
            s.streams.watch_buffer_bytes = keel::config::ByteSize(8 * 1024);
        })
        .await?;
        let mut events = slow_watcher(&app).await?;
        let mut writer = app.users()?;
        let name = "n".repeat(250);
        for i in 0..400 {
            writer.create_user(create(user(&format!("b{i:04}"), &name, "b@example.com"))).await?;
        }
        let (_, status) = until_error(&mut events).await?;
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("watch_buffer_bytes"), "{}", status.message());
        app.stop().await
    }

    /// Every list entry has a length limit, enforced by validation whatever
    /// the message size limits allow.
    #[tokio::test]
    async fn a_role_longer_than_its_limit_is_invalid_argument_naming_roles() -> Result<()> {
        let app =
            spawn_app_with(|s| s.grpc.max_decoding_message_size = keel::config::ByteSize(64 * 1024 * 1024)).await?;
        let mut long = user("long-role", "Long", "l@example.com");
        long.roles = vec!["r".repeat(65)];
        let status = app.users()?.create_user(create(long)).await.err().context("accepted")?;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("user.roles"), "{}", status.message());
        app.stop().await
    }

    #[tokio::test]
    async fn a_deadline_ends_watch_users_with_deadline_exceeded() -> Result<()> {
        let app = spawn_app().await?;
        let mut users = app.users()?;
        let mut request = tonic::Request::new(WatchUsersRequest {});
        request.set_timeout(Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        let mut events = users.watch_users(request).await?.into_inner();
        let outcome = tokio::time::timeout(READY_BOUND, events.message()).await?;
        let status = outcome.err().context("the watch did not fail")?;
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(started.elapsed() >= Duration::from_millis(250), "ended early: {:?}", started.elapsed());
        eventually(READY_BOUND, || async { app.live_streams.get() == 0 }).await?;
        app.stop().await
    }
}

#[tokio::test]
async fn shutdown_ends_watch_streams_with_unavailable() -> Result<()> {
    let app = spawn_app().await?;
    let mut users = app.users()?;
    let mut events = users.watch_users(WatchUsersRequest {}).await?.into_inner();
    let live = app.live_streams.clone();
    eventually(READY_BOUND, || async { live.get() == 1 }).await?;
    let stopping = tokio::spawn(app.stop());
    let status = tokio::time::timeout(READY_BOUND, events.message()).await?.err().context("the watch did not fail")?;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "server shutting down");
    stopping.await??;
    assert_eq!(live.get(), 0);
    Ok(())
}

/// The kernel's record of the server's side of the connection from
/// `client`: its timer kind (`2` is the keepalive timer) and when it fires,
/// from `/proc/net/tcp` (or `tcp6`), in clock ticks of 1/100 s.
#[cfg(target_os = "linux")]
fn server_socket_timer(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Result<Option<(u8, u64)>> {
    let hex_port = |port: u16| format!("{port:04X}");
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).with_context(|| format!("reading {table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(timer)) = (fields.get(1), fields.get(2), fields.get(5)) else {
                continue;
            };
            if local.ends_with(&format!(":{}", hex_port(server.port())))
                && remote.ends_with(&format!(":{}", hex_port(client.port())))
            {
                let (kind, when) = timer.split_once(':').context("timer field")?;
                return Ok(Some((u8::from_str_radix(kind, 16)?, u64::from_str_radix(when, 16)?)));
            }
        }
    }
    Ok(None)
}

/// A raw connection the server has accepted and served: the client
/// preface sent and the server's SETTINGS read back.
async fn served_connection(addr: std::net::SocketAddr) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
    let (kind, _, _) = tokio::time::timeout(READY_BOUND, read_frame(&mut stream)).await??;
    anyhow::ensure!(kind == 4, "the server's first frame is type {kind}, not SETTINGS");
    // Acknowledged, as a client must.
    stream.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await?;
    Ok(stream)
}

/// One HTTP/2 frame: its type, its flags and its payload.
async fn read_frame(stream: &mut tokio::net::TcpStream) -> Result<(u8, u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await?;
    let mut payload = vec![0u8; usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])];
    stream.read_exact(&mut payload).await?;
    Ok((header[3], header[4], payload))
}

/// The server socket's timer once no data is in flight (kind 1, the
/// retransmit timer, shows while an ACK is outstanding).
#[cfg(target_os = "linux")]
async fn settled_timer(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Result<(u8, u64)> {
    let mut timer = None;
    eventually(READY_BOUND, || {
        timer = server_socket_timer(server, client).ok().flatten();
        let settled = timer.is_some_and(|(kind, _)| kind != 1);
        async move { settled }
    })
    .await
    .with_context(|| format!("the server's socket for {client}: {timer:?}"))?;
    timer.context("no server socket")
}

/// Accepted connections carry the kernel's keepalive with the configured
/// idle time, so dead peers are found at no cost per call; `0s` turns it
/// off.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn accepted_connections_get_the_configured_tcp_keepalive() -> Result<()> {
    let app = spawn_app_with(|s| s.grpc.tcp_keepalive = Duration::from_secs(123)).await?;
    let stream = served_connection(app.grpc_addr).await?;
    let (kind, when) = settled_timer(app.grpc_addr, stream.local_addr()?).await?;
    assert_eq!(kind, 2, "not the keepalive timer");
    assert!((11_000..=12_300).contains(&when), "keepalive fires in {when} ticks, not within 123s");
    // An open connection would hold the server's drain.
    drop(stream);

    let off = spawn_app_with(|s| s.grpc.tcp_keepalive = Duration::ZERO).await?;
    let stream = served_connection(off.grpc_addr).await?;
    let (kind, _) = settled_timer(off.grpc_addr, stream.local_addr()?).await?;
    assert_eq!(kind, 0, "a timer on an idle connection with tcp_keepalive 0s");
    drop(stream);
    off.stop().await?;
    app.stop().await
}

/// With `grpc.keepalive_interval` set, the server sends HTTP/2 PINGs on an
/// idle connection (read off the wire by a client that only reads frames).
#[tokio::test]
async fn http2_pings_go_out_when_keepalive_interval_is_set() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|s| s.grpc.keepalive_interval = Duration::from_millis(100)).await?;
    let mut stream = served_connection(app.grpc_addr).await?;
    let ping = tokio::time::timeout(READY_BOUND, async {
        loop {
            let (kind, flags, payload) = read_frame(&mut stream).await?;
            match (kind, flags) {
                // SETTINGS (not an ACK): acknowledged, as a client must.
                (4, 0) => stream.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await?,
                // A PING that is not an ACK.
                (6, 0) => return Ok::<_, anyhow::Error>(payload),
                _ => {}
            }
        }
    })
    .await
    .context("no PING within the bound")??;
    assert_eq!(ping.len(), 8, "a PING carries 8 bytes");
    drop(stream);
    app.stop().await
}
