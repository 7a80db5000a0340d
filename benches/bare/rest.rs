//! The bare REST baseline of `scripts/bench`: an axum handler for
//! `GET /v1/users/{id}` that calls the bare gRPC server over one shared
//! tonic `Channel` and answers the user as JSON — the hop keel's gateway
//! makes, with no route table, transcoding descriptors, metrics or limits.
//!
//! Built only with `--features bench-bare`. Usage:
//! `bare-rest [LISTEN_ADDR] [GRPC_URL]` (defaults `127.0.0.1:8180` and
//! `http://127.0.0.1:9100`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use keel::proto::user::v1::user_service_client::UserServiceClient;
use keel::proto::user::v1::{GetUserRequest, User};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

fn timestamp(t: Option<&prost_types::Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// The same fields, names and timestamp form as keel's proto3 JSON.
fn user_json(user: &User) -> Value {
    json!({
        "user_id": user.user_id,
        "display_name": user.display_name,
        "email": user.email,
        "roles": user.roles,
        "create_time": timestamp(user.create_time.as_ref()),
        "update_time": timestamp(user.update_time.as_ref()),
    })
}

/// By hand: axum's `json` feature is off in keel's manifest, and turning
/// it on here would change the dependency keel itself is built with.
fn json_response(code: StatusCode, body: &Value) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn get_user(State(client): State<UserServiceClient<Channel>>, Path(user_id): Path<String>) -> Response {
    // Cloning the client clones the shared Channel handle, not a connection.
    let mut client = client;
    match client.get_user(GetUserRequest { user_id }).await {
        Ok(response) => json_response(StatusCode::OK, &user_json(response.get_ref())),
        Err(status) => {
            let code = match status.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let body = json!({"code": status.code() as i32, "message": status.message(), "details": []});
            json_response(code, &body)
        }
    }
}

fn fail(what: &str, error: &dyn std::fmt::Display) -> ! {
    eprintln!("bare-rest: {what}: {error}");
    std::process::exit(1);
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8180".to_owned());
    let upstream = args.next().unwrap_or_else(|| "http://127.0.0.1:9100".to_owned());
    let endpoint = Endpoint::from_shared(upstream).unwrap_or_else(|e| fail("bad upstream URL", &e));
    // Lazy, so this process can start before the gRPC server; the first
    // call connects.
    let channel = endpoint.tcp_nodelay(true).connect_lazy();
    let router = Router::new().route("/v1/users/{user_id}", get(get_user)).with_state(UserServiceClient::new(channel));
    let listener = tokio::net::TcpListener::bind(&listen).await.unwrap_or_else(|e| fail("cannot bind", &e));
    // As keel's gateway does: axum leaves Nagle on, which delays small
    // responses.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    if let Err(error) = axum::serve(listener, router).await {
        fail("serve", &error);
    }
}
