//! A small HTTP/1.1 client over hyper for gateway tests: whole responses,
//! or a response whose body is read frame by frame.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// HTTP trailers, when the server sent any.
    pub trailers: Option<HeaderMap>,
}

impl HttpResponse {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
pub struct HttpClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpClient {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self { base: format!("http://{addr}"), client: Client::builder(TokioExecutor::new()).build_http() }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder().method(method).uri(format!("{}{path}", self.base));
        // A content-type given as "" means: send none.
        if body.is_some() && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
            builder = builder.header("content-type", "application/json");
        }
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("content-type") && value.is_empty() {
                continue;
            }
            builder = builder.header(*name, *value);
        }
        Ok(builder.body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))?)
    }

    /// Sends a request and reads the whole response.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<HttpResponse> {
        let request = self.request(method, path, headers, body)?;
        let response = tokio::time::timeout(Duration::from_secs(20), self.client.request(request)).await??;
        let (parts, body) = response.into_parts();
        let collected = tokio::time::timeout(Duration::from_secs(20), body.collect()).await??;
        let trailers = collected.trailers().cloned();
        Ok(HttpResponse { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers })
    }

    pub async fn get(&self, path: &str) -> Result<HttpResponse> {
        self.send(Method::GET, path, &[], None).await
    }

    /// Sends a request and hands back the open response.
    pub async fn open(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Result<OpenResponse> {
        let request = self.request(method, path, headers, None)?;
        let response = tokio::time::timeout(Duration::from_secs(20), self.client.request(request)).await??;
        let (parts, body) = response.into_parts();
        Ok(OpenResponse { status: parts.status, headers: parts.headers, body, pending: String::new() })
    }
}

/// A response being read as it arrives.
pub struct OpenResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    pending: String,
}

impl OpenResponse {
    /// The next complete line (without its newline), or `None` at the end.
    pub async fn line(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(at) = self.pending.find('\n') {
                let line = self.pending[..at].to_owned();
                self.pending.drain(..=at);
                return Ok(Some(line));
            }
            let frame =
                tokio::time::timeout(Duration::from_secs(20), self.body.frame()).await.context("no data within 20s")?;
            match frame {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.pending.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                None if self.pending.is_empty() => return Ok(None),
                None => return Ok(Some(std::mem::take(&mut self.pending))),
            }
        }
    }

    /// Every remaining line.
    pub async fn lines(&mut self) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        while let Some(line) = self.line().await? {
            lines.push(line);
        }
        Ok(lines)
    }
}
