//! What an operator sees: exact Prometheus series after known calls (read
//! with a real exposition parser), readiness, and request ids in the JSON
//! logs of both servers.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use http::{Method, StatusCode};
use keel::proto::user::v1::{CreateUserRequest, GetUserRequest, ListUsersRequest, User, WatchUsersRequest};
use support::{READY_BOUND, eventually, sample, spawn_app};
use tokio_stream::StreamExt;

const SERVICE: &str = "user.v1.UserService";

fn series<'a>(method: &'a str, kind: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("grpc_service", SERVICE), ("grpc_method", method), ("grpc_type", kind)]
}

fn with_code<'a>(method: &'a str, kind: &'a str, code: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut labels = series(method, kind);
    labels.push(("grpc_code", code));
    labels
}

async fn create(app: &support::TestApp, id: &str) -> Result<()> {
    let user =
        User { user_id: id.into(), display_name: id.into(), email: format!("{id}@example.com"), ..Default::default() };
    app.users()?.create_user(CreateUserRequest { user: Some(user) }).await?;
    Ok(())
}

#[tokio::test]
async fn unary_calls_are_counted_exactly_by_code() -> Result<()> {
    let app = spawn_app().await?;
    let before = app.scrape().await?;
    // Every method's series exist, at zero, before any call.
    for code in ["OK", "NotFound", "Canceled", "Unauthenticated"] {
        let labels = with_code("DeleteUser", "unary", code);
        assert_eq!(sample(&before, "grpc_server_handled_total", &labels), Some(0.0), "DeleteUser {code}");
    }
    assert_eq!(sample(&before, "grpc_server_started_total", &series("WatchUsers", "server_stream")), Some(0.0));

    create(&app, "m1").await?;
    let mut users = app.users()?;
    let n = 7;
    for _ in 0..n {
        users.get_user(GetUserRequest { user_id: "m1".into() }).await?;
    }
    let miss = users.get_user(GetUserRequest { user_id: "nobody".into() }).await;
    assert_eq!(miss.err().map(|s| s.code()), Some(tonic::Code::NotFound));

    let after = app.scrape().await?;
    let handled = |code| sample(&after, "grpc_server_handled_total", &with_code("GetUser", "unary", code));
    assert_eq!(handled("OK"), Some(f64::from(n)));
    assert_eq!(handled("NotFound"), Some(1.0));
    assert_eq!(sample(&after, "grpc_server_started_total", &series("GetUser", "unary")), Some(f64::from(n + 1)));
    assert_eq!(sample(&after, "grpc_server_msg_received_total", &series("GetUser", "unary")), Some(f64::from(n + 1)));
    assert_eq!(
        sample(&after, "grpc_server_msg_sent_total", &series("GetUser", "unary")),
        Some(f64::from(n)),
        "errors send no message"
    );
    let count = sample(&after, "grpc_server_handling_seconds_count", &series("GetUser", "unary"));
    assert_eq!(after.types.get("grpc_server_handling_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(count, Some(f64::from(n + 1)), "the histogram counts every handled call");
    app.stop().await
}

#[tokio::test]
async fn streams_count_every_message_and_cancellation() -> Result<()> {
    let app = spawn_app().await?;
    for id in ["s1", "s2", "s3", "s4", "s5"] {
        create(&app, id).await?;
    }
    let listed: Vec<User> =
        app.users()?.list_users(ListUsersRequest {}).await?.into_inner().collect::<Result<_, _>>().await?;
    assert_eq!(listed.len(), 5);

    let mut watch = app.users()?.watch_users(WatchUsersRequest {}).await?.into_inner();
    create(&app, "s6").await?;
    create(&app, "s7").await?;
    for _ in 0..2 {
        watch.message().await?.context("watch ended")?;
    }
    drop(watch);
    let canceled = with_code("WatchUsers", "server_stream", "Canceled");
    eventually(READY_BOUND, || async {
        let scrape = app.scrape().await.ok();
        scrape.is_some_and(|s| sample(&s, "grpc_server_handled_total", &canceled) == Some(1.0))
    })
    .await
    .context("the cancelled watch was not recorded as Canceled")?;
    let scrape = app.scrape().await?;
    let list = series("ListUsers", "server_stream");
    assert_eq!(sample(&scrape, "grpc_server_msg_sent_total", &list), Some(5.0));
    assert_eq!(sample(&scrape, "grpc_server_msg_received_total", &list), Some(1.0));
    assert_eq!(sample(&scrape, "grpc_server_handled_total", &with_code("ListUsers", "server_stream", "OK")), Some(1.0));
    assert_eq!(sample(&scrape, "grpc_server_msg_sent_total", &series("WatchUsers", "server_stream")), Some(2.0));
    assert_eq!(sample(&scrape, "keel_grpc_live_streams", &[]), Some(0.0));
    app.stop().await
}

#[tokio::test]
async fn gateway_calls_are_measured_by_route_template_and_on_both_grpc_sides() -> Result<()> {
    let app = spawn_app().await?;
    let http = app.http();
    create(&app, "ada").await?;
    for path in ["/v1/users/ada", "/v1/users/ada", "/v1/users/nobody", "/no/such/path"] {
        http.get(path).await?;
    }
    let scrape = app.scrape().await?;
    let route = |route: &str, code: &str| {
        sample(&scrape, "http_requests_total", &[("method", "GET"), ("route", route), ("code", code)])
    };
    assert_eq!(route("/v1/users/{user_id}", "200"), Some(2.0));
    assert_eq!(route("/v1/users/{user_id}", "404"), Some(1.0));
    assert_eq!(route("unmatched", "404"), Some(1.0));
    for s in &scrape.samples {
        for value in s.labels.values() {
            assert!(
                !value.contains("ada") && !value.contains("nobody") && !value.contains("/no/such"),
                "raw path in {s:?}"
            );
        }
    }
    let client = with_code("GetUser", "unary", "OK");
    assert_eq!(sample(&scrape, "grpc_client_handled_total", &client), Some(2.0));
    assert_eq!(sample(&scrape, "grpc_client_handled_total", &with_code("GetUser", "unary", "NotFound")), Some(1.0));
    // The gateway's calls run the whole server stack too.
    assert_eq!(sample(&scrape, "grpc_server_handled_total", &client), Some(2.0));
    for name in
        ["process_resident_memory_bytes", "process_start_time_seconds", "process_open_fds", "process_cpu_seconds_total"]
    {
        assert!(sample(&scrape, name, &[]).is_some_and(|v| v > 0.0), "{name} missing or zero");
    }
    assert_eq!(
        sample(
            &scrape,
            "keel_build_info",
            &[("version", option_env!("KEEL_VERSION").unwrap_or(env!("CARGO_PKG_VERSION")))]
        ),
        Some(1.0)
    );
    // Test settings: no drain delay, a 5s bound, then the 0.5s abort grace
    // and the 1s final flush.
    assert_eq!(sample(&scrape, "keel_shutdown_budget_seconds", &[]), Some(6.5));
    assert_eq!(sample(&scrape, "keel_log_lines_dropped_total", &[]), Some(0.0));
    app.stop().await
}

#[tokio::test]
async fn readyz_follows_the_health_state() -> Result<()> {
    let app = spawn_app().await?;
    let admin = app.admin();
    let ready = admin.get("/readyz").await?;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(admin.get("/livez").await?.status, StatusCode::OK);

    app.health_state.set_not_serving().await;
    let unready = admin.get("/readyz").await?;
    assert_eq!(unready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(unready.text().contains("NOT_SERVING"), "{}", unready.text());
    let verbose = admin.get("/readyz?verbose").await?;
    assert!(verbose.text().contains("[+]startup ok"), "{}", verbose.text());
    assert!(verbose.text().contains("[-]grpc-health failed"), "{}", verbose.text());
    assert_eq!(admin.get("/livez").await?.status, StatusCode::OK, "liveness does not follow readiness");

    app.health_state.set_serving().await;
    assert_eq!(admin.get("/readyz").await?.status, StatusCode::OK);
    app.stop().await
}

/// Captures the JSON log lines of this test binary.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().map(|b| b.clone()).unwrap_or_default()).into_owned()
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

fn captured_logs() -> Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        let settings = keel::config::LogSettings::default();
        let tracing = keel::config::TracingSettings::default();
        // The writer thread lives until flush_logs(), which no test calls.
        let _guard = keel::telemetry::install(&settings, &tracing, Some("info"), writer);
        logs
    })
    .clone()
}

#[tokio::test]
async fn a_request_id_follows_the_call_through_gateway_and_grpc_logs() -> Result<()> {
    let logs = captured_logs();
    let app = spawn_app().await?;
    create(&app, "rid").await?;
    let response = app.http().send(Method::GET, "/v1/users/rid", &[("x-request-id", "trace-me-4711")], None).await?;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("x-request-id"), Some("trace-me-4711"));

    let generated = app.http().get("/v1/users/rid").await?;
    let generated_id = generated.header("x-request-id").context("no generated id")?.to_owned();
    assert_eq!(generated_id.len(), 36, "a UUID is generated when none is sent");

    // Straight to gRPC, the id comes back as response metadata.
    let mut request = tonic::Request::new(GetUserRequest { user_id: "rid".into() });
    request.metadata_mut().insert("x-request-id", "grpc-side-99".parse()?);
    let grpc_response = app.users()?.get_user(request).await?;
    assert_eq!(grpc_response.metadata().get("x-request-id").and_then(|v| v.to_str().ok()), Some("grpc-side-99"));

    for id in ["trace-me-4711", generated_id.as_str(), "grpc-side-99"] {
        eventually(READY_BOUND, || async {
            logs.lines().iter().any(|line| {
                line["message"] == "rpc finished"
                    && line["request_id"] == id
                    && line["grpc.method"] == "/user.v1.UserService/GetUser"
                    && line["grpc.code"] == "OK"
                    && line.get("span").is_none()
                    && line["peer"].is_string()
                    && line["duration_ms"].is_number()
            })
        })
        .await
        .with_context(|| format!("no gRPC log line with request id {id}"))?;
    }
    // Each field once per access line (the id used to be in the span too).
    let raw = logs.raw();
    for line in raw.lines().filter(|l| l.contains("\"rpc finished\"")) {
        assert_eq!(line.matches("\"request_id\":").count(), 1, "{line}");
        assert_eq!(line.matches("\"grpc.method\":").count(), 1, "{line}");
    }
    app.stop().await
}

#[tokio::test]
async fn grpc_responses_echo_the_request_id_unless_turned_off() -> Result<()> {
    let logs = captured_logs();
    let app = spawn_app().await?;
    create(&app, "echo").await?;
    let generated = app.users()?.get_user(GetUserRequest { user_id: "echo".into() }).await?;
    let id = generated.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).context("no echoed id")?;
    assert_eq!(id.len(), 36, "a generated UUID: {id}");
    // Errors are trailers-only responses: the id is on them too.
    let missing = app.users()?.get_user(GetUserRequest { user_id: "nobody".into() }).await;
    let status = missing.err().context("an unknown user is an error")?;
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.metadata().get("x-request-id").map(|v| v.len()), Some(36));
    // The gateway's answer carries its one id, and the gRPC side's echo as
    // metadata, as grpc-gateway forwards it.
    let response = app.http().send(Method::GET, "/v1/users/echo", &[("x-request-id", "via-rest-1")], None).await?;
    assert_eq!(response.status, StatusCode::OK);
    let ids: Vec<_> = response.headers.get_all("x-request-id").iter().map(|v| v.as_bytes().to_vec()).collect();
    assert_eq!(ids, vec![b"via-rest-1".to_vec()]);
    assert_eq!(response.header("grpc-metadata-x-request-id"), Some("via-rest-1"));
    app.stop().await?;

    let quiet = support::spawn_app_with(|settings| settings.grpc.echo_request_id = false).await?;
    create(&quiet, "echo").await?;
    let mut request = tonic::Request::new(GetUserRequest { user_id: "echo".into() });
    request.metadata_mut().insert("x-request-id", "not-echoed-7".parse()?);
    let answered = quiet.users()?.get_user(request).await?;
    assert_eq!(answered.metadata().get("x-request-id"), None, "grpc.echo_request_id: false");
    // Still the call's id everywhere else, and still echoed by the gateway.
    eventually(READY_BOUND, || async {
        logs.lines().iter().any(|line| line["message"] == "rpc finished" && line["request_id"] == "not-echoed-7")
    })
    .await
    .context("the id is still logged")?;
    let response = quiet.http().send(Method::GET, "/v1/users/echo", &[("x-request-id", "via-rest-2")], None).await?;
    assert_eq!(response.header("x-request-id"), Some("via-rest-2"));
    assert_eq!(response.header("grpc-metadata-x-request-id"), None);
    quiet.stop().await
}

/// The bytes a connection read, kept for the test to parse.
struct Recording {
    io: tokio::net::TcpStream,
    read: Arc<Mutex<Vec<u8>>>,
}

impl tokio::io::AsyncRead for Recording {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        let fresh = buf.filled()[before..].to_vec();
        self.read.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(&fresh);
        polled
    }
}

impl tokio::io::AsyncWrite for Recording {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The header blocks of the HEADERS frames in `bytes` (server to client,
/// so no preface) that do not end their stream: the response headers, in
/// order. Padding and priority are not used by the server.
fn response_header_blocks(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut blocks = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = usize::from(bytes[at]) << 16 | usize::from(bytes[at + 1]) << 8 | usize::from(bytes[at + 2]);
        let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
        let payload = bytes.get(at + 9..at + 9 + len).context("a truncated frame")?;
        anyhow::ensure!(kind != 0x9, "CONTINUATION frames are not expected here");
        if kind == 0x1 && flags & 0x1 == 0 {
            anyhow::ensure!(flags & 0x4 != 0, "a header block split over frames");
            blocks.push(payload.to_vec());
        }
        at += 9 + len;
    }
    Ok(blocks)
}

/// One HPACK field representation (RFC 7541 §6): its kind, and its name's
/// table index (0: the name is spelled out).
#[derive(Debug, PartialEq)]
enum Field {
    Indexed,
    Incremental { name: u64 },
    WithoutIndexing { name: u64 },
    NeverIndexed { name: u64 },
}

fn hpack_int(block: &[u8], at: &mut usize, prefix: u32) -> Result<u64> {
    let mask = (1u16 << prefix) - 1;
    let first = u16::from(*block.get(*at).context("a truncated integer")?) & mask;
    *at += 1;
    if first < mask {
        return Ok(u64::from(first));
    }
    let (mut value, mut shift) = (u64::from(mask), 0);
    loop {
        let byte = *block.get(*at).context("a truncated integer")?;
        *at += 1;
        value += u64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

fn hpack_skip_string(block: &[u8], at: &mut usize) -> Result<()> {
    let len = usize::try_from(hpack_int(block, at, 7)?)?;
    *at += len;
    anyhow::ensure!(*at <= block.len(), "a truncated string");
    Ok(())
}

/// The field representations of one header block; strings are skipped,
/// not decoded: what matters here is how each field refers to its name.
fn hpack_fields(block: &[u8]) -> Result<Vec<Field>> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < block.len() {
        let first = block[at];
        let field = if first & 0x80 != 0 {
            hpack_int(block, &mut at, 7)?;
            Field::Indexed
        } else if first & 0x40 != 0 {
            Field::Incremental { name: hpack_int(block, &mut at, 6)? }
        } else if first & 0x20 != 0 {
            hpack_int(block, &mut at, 5)?; // a table size update
            continue;
        } else if first & 0x10 != 0 {
            Field::NeverIndexed { name: hpack_int(block, &mut at, 4)? }
        } else {
            Field::WithoutIndexing { name: hpack_int(block, &mut at, 4)? }
        };
        if let Field::Incremental { name } | Field::WithoutIndexing { name } | Field::NeverIndexed { name } = field {
            if name == 0 {
                hpack_skip_string(block, &mut at)?;
            }
            hpack_skip_string(block, &mut at)?;
        }
        fields.push(field);
    }
    Ok(fields)
}

/// Request ids are unique, so they are never indexed; but the first
/// response of a connection sends its id indexable, so the name has a
/// table entry and every later id names it by index instead of spelling
/// out `x-request-id` again (9 bytes fewer per response). Read off the
/// bytes a raw HTTP/2 client received.
#[tokio::test]
async fn echoed_request_ids_name_the_header_by_index_after_the_first_response() -> Result<()> {
    use prost::Message as _;

    let app = spawn_app().await?;
    create(&app, "indexed").await?;
    let read = Arc::new(Mutex::new(Vec::new()));
    let tcp = tokio::net::TcpStream::connect(app.grpc_addr).await?;
    let (client, connection) = h2::client::handshake(Recording { io: tcp, read: read.clone() }).await?;
    tokio::spawn(connection);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut client = client.clone().ready().await?;
        let request = support::raw_grpc_request(app.grpc_addr, &format!("{SERVICE}/GetUser"))?;
        let (response, mut send) = client.send_request(request, false)?;
        let message = GetUserRequest { user_id: "indexed".into() }.encode_to_vec();
        send.send_data(bytes::Bytes::from(support::grpc_frame(&message)?), true)?;
        let response = tokio::time::timeout(READY_BOUND, response).await??;
        ids.push(response.headers().get("x-request-id").cloned().context("no echoed id")?);
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            chunk?;
        }
        let trailers = body.trailers().await?.context("no trailers")?;
        assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    }
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "each call has its own id: {ids:?}");

    let blocks = response_header_blocks(&read.lock().unwrap())?;
    assert_eq!(blocks.len(), 3, "one response header block per call");
    let fields: Vec<Vec<Field>> = blocks.iter().map(|block| hpack_fields(block)).collect::<Result<_>>()?;
    // The first spells the name out once, indexable: the only field with
    // a name not in the static table.
    let spelled: Vec<&Field> = fields[0].iter().filter(|f| matches!(f, Field::Incremental { name: 0 })).collect();
    assert_eq!(spelled.len(), 1, "{:?}", fields[0]);
    for (later, block) in fields[1..].iter().zip(&blocks[1..]) {
        // No name spelled out, and the id never indexed, its name from the
        // dynamic table (indexes above the static table's 61).
        assert!(
            !later.iter().any(|f| matches!(
                f,
                Field::Incremental { name: 0 } | Field::WithoutIndexing { name: 0 } | Field::NeverIndexed { name: 0 }
            )),
            "{later:?}"
        );
        let never: Vec<&Field> = later.iter().filter(|f| matches!(f, Field::NeverIndexed { .. })).collect();
        assert!(matches!(never[..], [Field::NeverIndexed { name }] if *name > 61), "{later:?}");
        assert!(block.len() + 8 <= blocks[0].len(), "blocks of {} and {} bytes", blocks[0].len(), block.len());
    }
    app.stop().await
}
