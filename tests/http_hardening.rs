//! The HTTP servers (gateway and admin) against hostile clients, over raw
//! TCP so that exactly what reaches the socket is controlled: unfinished
//! headers (slowloris), a body shorter than its Content-Length, idle
//! keep-alive connections, and more connections than the cap.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use keel::config::Settings;
use serde_json::Value;
use support::{READY_BOUND, eventually, sample, spawn_app_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_millis(400);
const BODY_TIMEOUT: Duration = Duration::from_millis(400);
const IDLE_TIMEOUT: Duration = Duration::from_millis(600);

fn short_timeouts(settings: &mut Settings) {
    settings.http.header_read_timeout = HEADER_TIMEOUT;
    settings.http.body_read_timeout = BODY_TIMEOUT;
    settings.http.idle_timeout = IDLE_TIMEOUT;
    settings.admin.header_read_timeout = HEADER_TIMEOUT;
    settings.admin.idle_timeout = IDLE_TIMEOUT;
}

/// Reads until the server closes the connection; returns what it sent and
/// when it closed. A reset counts as closed.
async fn read_until_closed(stream: &mut TcpStream) -> Result<(Vec<u8>, Instant)> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(READY_BOUND, stream.read(&mut buf)).await.context("the server never closed")? {
            Ok(0) | Err(_) => return Ok((received, Instant::now())),
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_response(stream: &mut TcpStream) -> Result<(String, String)> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .context("no content-length")?
                .parse()?;
            if received.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&received[end + 4..end + 4 + length]).into_owned();
                return Ok((head, body));
            }
        }
        let n = tokio::time::timeout(READY_BOUND, stream.read(&mut buf)).await.context("no response")??;
        ensure!(n > 0, "closed before a full response: {:?}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buf[..n]);
    }
}

/// Closed no earlier than `bound` minus a little, and within `bound` plus
/// scheduling slack.
fn closed_after(opened: Instant, closed: Instant, bound: Duration) -> Result<()> {
    let took = closed - opened;
    ensure!(took >= bound.mul_f32(0.8), "closed after {took:?}, before its bound {bound:?}");
    ensure!(took < bound + Duration::from_secs(2), "closed after {took:?}, long past its bound {bound:?}");
    Ok(())
}

async fn slowloris(addr: SocketAddr) -> Result<()> {
    // Headers begun, never finished.
    let mut stream = TcpStream::connect(addr).await?;
    let opened = Instant::now();
    stream.write_all(b"GET /livez HTTP/1.1\r\nHost: keel\r\nX-Slow: ").await?;
    let (received, closed) = read_until_closed(&mut stream).await?;
    closed_after(opened, closed, HEADER_TIMEOUT)?;
    ensure!(received.is_empty() || received.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&received));

    // Nothing at all after connecting.
    let mut stream = TcpStream::connect(addr).await?;
    let opened = Instant::now();
    let (_, closed) = read_until_closed(&mut stream).await?;
    closed_after(opened, closed, HEADER_TIMEOUT)?;

    // One byte at a time, each well within the bound: the head as a whole
    // must still arrive in time.
    let stream = TcpStream::connect(addr).await?;
    let opened = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let dribble = tokio::spawn(async move {
        for byte in b"GET /livez HTTP/1.1\r\nHost: keel\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(READY_BOUND, reader.read(&mut buf)).await?;
    ensure!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    closed_after(opened, Instant::now(), HEADER_TIMEOUT)?;
    dribble.abort();
    Ok(())
}

#[tokio::test]
async fn unfinished_headers_are_cut_off_after_the_header_timeout() -> Result<()> {
    let app = spawn_app_with(short_timeouts).await?;
    slowloris(app.http_addr).await.context("gateway")?;
    slowloris(app.admin_addr).await.context("admin")?;
    app.stop().await
}

#[tokio::test]
async fn a_stalled_body_gets_408_with_a_status_body() -> Result<()> {
    let app = spawn_app_with(short_timeouts).await?;
    let mut stream = TcpStream::connect(app.http_addr).await?;
    // Promises 100 bytes, sends 1.
    stream
        .write_all(
            b"POST /v1/users HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await?;
    let sent = Instant::now();
    let (head, body) = read_response(&mut stream).await?;
    let took = sent.elapsed();
    ensure!(head.starts_with("HTTP/1.1 408"), "{head}");
    ensure!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    ensure!(took >= BODY_TIMEOUT.mul_f32(0.8) && took < BODY_TIMEOUT + Duration::from_secs(2), "408 after {took:?}");
    let status: Value = serde_json::from_str(&body)?;
    ensure!(status["code"] == 4, "DEADLINE_EXCEEDED expected: {status}");
    ensure!(status["message"].as_str().is_some_and(|m| m.contains("http.body_read_timeout")), "{status}");
    let (_, _) = read_until_closed(&mut stream).await?;
    app.stop().await
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_but_streams_are_not() -> Result<()> {
    let app = spawn_app_with(|s| {
        short_timeouts(s);
        // Longer than the idle timeout, so the idle timeout is what closes.
        s.http.header_read_timeout = Duration::from_secs(5);
        s.admin.header_read_timeout = Duration::from_secs(5);
    })
    .await?;
    for addr in [app.http_addr, app.admin_addr] {
        let mut stream = TcpStream::connect(addr).await?;
        let path = if addr == app.http_addr { "/healthz" } else { "/livez" };
        for _ in 0..2 {
            stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: keel\r\n\r\n").as_bytes()).await?;
            let (head, _) = read_response(&mut stream).await?;
            ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        let idle_since = Instant::now();
        let (received, closed) = read_until_closed(&mut stream).await?;
        ensure!(received.is_empty());
        closed_after(idle_since, closed, IDLE_TIMEOUT)?;
    }

    // A watch sends nothing while nothing changes, and is not idle.
    let mut stream = TcpStream::connect(app.http_addr).await?;
    stream.write_all(b"GET /v1/users:watch HTTP/1.1\r\nHost: keel\r\n\r\n").await?;
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    ensure!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    match tokio::time::timeout(IDLE_TIMEOUT * 3, stream.read(&mut buf)).await {
        Err(_) => {}
        Ok(read) => anyhow::bail!("the watch ended while idle: {read:?}"),
    }
    drop(stream);
    app.stop().await
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_counted() -> Result<()> {
    let app = spawn_app_with(|s| {
        s.http.max_connections = 2;
        s.admin.max_connections = 2;
    })
    .await?;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(app.http_addr).await?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n").await?;
        let (head, _) = read_response(&mut stream).await?;
        ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(stream);
    }
    let mut refused = TcpStream::connect(app.http_addr).await?;
    let opened = Instant::now();
    let _ = refused.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n").await;
    let (received, closed) = read_until_closed(&mut refused).await?;
    ensure!(received.is_empty(), "{:?}", String::from_utf8_lossy(&received));
    ensure!(closed - opened < Duration::from_secs(1), "the refused connection lingered {:?}", closed - opened);

    let scrape = app.scrape().await?;
    let rejected = sample(&scrape, "keel_http_connections_rejected_total", &[("server", "gateway")]);
    ensure!(rejected == Some(1.0), "rejected: {rejected:?}");

    // A slot frees when a connection closes.
    drop(held.pop());
    eventually(READY_BOUND, || async {
        let Ok(mut stream) = TcpStream::connect(app.http_addr).await else { return false };
        if stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n").await.is_err() {
            return false;
        }
        read_response(&mut stream).await.is_ok_and(|(head, _)| head.starts_with("HTTP/1.1 200"))
    })
    .await?;
    drop(held);
    app.stop().await
}

#[tokio::test]
async fn an_http2_connection_without_requests_is_closed_too() -> Result<()> {
    // hyper's own header timeout covers only HTTP/1.1; the watchdog covers
    // HTTP/2 (prior knowledge) and the protocol sniffing before it.
    let app = spawn_app_with(short_timeouts).await?;
    let mut stream = TcpStream::connect(app.http_addr).await?;
    let opened = Instant::now();
    // The client preface and an empty SETTINGS frame, then nothing.
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await?;
    let (received, closed) = read_until_closed(&mut stream).await?;
    closed_after(opened, closed, HEADER_TIMEOUT)?;
    // The server's SETTINGS, then a GOAWAY (frame type 7) before closing.
    let mut frame_types = Vec::new();
    let mut rest = received.as_slice();
    while rest.len() >= 9 {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        frame_types.push(rest[3]);
        rest = &rest[(9 + length).min(rest.len())..];
    }
    ensure!(frame_types.contains(&0x7), "no GOAWAY among the frames {frame_types:?}");

    // Half a preface: still sniffing the protocol, and still bounded.
    let mut stream = TcpStream::connect(app.http_addr).await?;
    let opened = Instant::now();
    stream.write_all(b"PRI * HT").await?;
    let (_, closed) = read_until_closed(&mut stream).await?;
    closed_after(opened, closed, HEADER_TIMEOUT)?;
    app.stop().await
}
