//! Conformance with grpc-gateway v2, one table row per behaviour: the
//! request, the expected status, headers and body, and a comment citing the
//! grpc-gateway rule the row follows (its `runtime` package: errors.go,
//! query.go, mux.go, handler.go, context.go, marshaler_registry.go) or why
//! keel departs from it. The rows run against the test-only echo service
//! (tests/proto/echo/v1), whose backend echoes each request and is steered
//! by metadata (tests/support/echo.rs).

mod support;

use anyhow::{Context as _, Result, bail};
use http::{Method, StatusCode};
use keel::config::{CorsSettings, HttpSettings, UnknownFields};
use serde_json::Value;
use support::echo_gateway::EchoGateway;

/// Which gateway a row runs against.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    /// The defaults.
    Default,
    /// `http.unknown_fields: ignore`.
    Lenient,
    /// `http.cors.allowed_origins: [https://app.example.com]`.
    Cors,
}

impl Setup {
    fn settings(self) -> HttpSettings {
        let mut settings = HttpSettings::default();
        match self {
            Self::Default => {}
            Self::Lenient => settings.unknown_fields = UnknownFields::Ignore,
            Self::Cors => {
                settings.cors =
                    CorsSettings { allowed_origins: vec!["https://app.example.com".into()], ..CorsSettings::default() }
            }
        }
        settings
    }
}

/// What a header must be: equal to a value, present, or absent.
#[derive(Clone, Copy, Debug)]
enum H {
    Is(&'static str),
    Present,
    Absent,
}

struct Row {
    name: &'static str,
    setup: Setup,
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: Option<&'static str>,
    status: u16,
    response_headers: &'static [(&'static str, H)],
    /// JSON pointer → expected JSON (as text); `"<absent>"` for a missing key.
    json: &'static [(&'static str, &'static str)],
    /// The exact raw body, for non-JSON responses.
    text: Option<&'static str>,
}

const ROW: Row = Row {
    name: "",
    setup: Setup::Default,
    method: "GET",
    path: "/",
    headers: &[],
    body: None,
    status: 200,
    response_headers: &[],
    json: &[],
    text: None,
};

const ROWS: &[Row] = &[
    // Fix 1. query.go parses a FieldMask query value by splitting on commas
    // and keeping the paths as written; keel accepts the proto names and the
    // JSON names alike and sends proto names.
    Row {
        name: "field mask in the query, proto names",
        path: "/v1/echo/m?mask=camel_case_field,nested.inner_id",
        json: &[("/mask", r#""camelCaseField,nested.innerId""#)],
        ..ROW
    },
    Row {
        name: "field mask in the query, JSON names, repeated",
        path: "/v1/echo/m?mask=camelCaseField&mask=nested.innerId",
        json: &[("/mask", r#""camelCaseField,nested.innerId""#)],
        ..ROW
    },
    // Fix 2. errors.go DefaultHTTPErrorHandler calls handleForwardResponseServerMetadata
    // and ...TrailerMetadata before writing the error body.
    Row {
        name: "error responses carry Grpc-Metadata-*",
        path: "/v1/echo/e",
        headers: &[("grpc-metadata-echo-status", "5")],
        status: 404,
        response_headers: &[("grpc-metadata-x-echo", H::Is("failed"))],
        json: &[("/code", "5"), ("/message", r#""echo-status""#)],
        ..ROW
    },
    // Fix 3. errors.go marshals the whole google.rpc.Status with protojson:
    // known details in full, an unresolvable Any as {"@type", "value": base64}
    // and a well-known type's JSON under "value".
    Row {
        name: "error details rendered in full",
        path: "/v1/echo/d",
        headers: &[("grpc-metadata-echo-status", "3"), ("grpc-metadata-echo-details", "all")],
        status: 400,
        json: &[
            ("/details/0/@type", r#""type.googleapis.com/google.rpc.BadRequest""#),
            ("/details/0/fieldViolations/0/field", r#""name""#),
            ("/details/1", r#"{"@type": "type.googleapis.com/acme.v1.Unknown", "value": "AQID"}"#),
            ("/details/2", r#"{"@type": "type.googleapis.com/google.protobuf.Empty", "value": {}}"#),
            ("/details/3", r#"{"@type": "type.googleapis.com/google.protobuf.Struct", "value": {"a": 1.0}}"#),
        ],
        ..ROW
    },
    // Fix 4. handler.go ForwardResponseStream writes the HTTP status of an
    // error that comes before the first message; a trailers-only gRPC answer
    // is exactly that.
    Row {
        name: "stream failing before its first message",
        path: "/v1/echo:stream?number=2",
        headers: &[("grpc-metadata-echo-status", "7")],
        status: 403,
        json: &[("/code", "7")],
        ..ROW
    },
    // Fix 5. marshaler_registry.go's default JSONPb has EmitUnpopulated:
    // unset messages are null; oneof members and proto3 optional stay absent,
    // as protojson writes them.
    Row {
        name: "unset singular messages are null",
        path: "/v1/echo/n",
        json: &[
            ("/nested", "null"),
            ("/when", "null"),
            ("/wait", "null"),
            ("/mask", "null"),
            ("/labels", "{}"),
            ("/maybe", "<absent>"),
            ("/maybeNested", "<absent>"),
            ("/text", "<absent>"),
            ("/picked", "<absent>"),
        ],
        ..ROW
    },
    // Fix 6. query.go populateField: enums by name or number, bools by
    // strconv.ParseBool, well-known types by their JSON form, maps as
    // field[key]=value.
    Row {
        name: "enum by number, in the query and in a repeated field",
        path: "/v1/echo/s?kind=2&kinds=1&kinds=KIND_B",
        json: &[("/kind", r#""KIND_B""#), ("/kinds", r#"["KIND_A", "KIND_B"]"#)],
        ..ROW
    },
    Row { name: "bool t", path: "/v1/echo/s?flag=t", json: &[("/flag", "true")], ..ROW },
    Row { name: "bool True", path: "/v1/echo/s?flag=True", json: &[("/flag", "true")], ..ROW },
    Row { name: "bool F", path: "/v1/echo/s?flag=F", json: &[("/flag", "false")], ..ROW },
    Row { name: "bool 0", path: "/v1/echo/s?flag=0", json: &[("/flag", "false")], ..ROW },
    Row { name: "bool tRuE is not ParseBool", path: "/v1/echo/s?flag=tRuE", status: 400, ..ROW },
    Row { name: "duration 90s", path: "/v1/echo/s?wait=90s", json: &[("/wait", r#""90s""#)], ..ROW },
    Row {
        name: "map entries",
        path: "/v1/echo/s?labels[a]=1&labels[b]=x%20y",
        json: &[("/labels", r#"{"a": "1", "b": "x y"}"#)],
        ..ROW
    },
    Row { name: "bool in the path", path: "/v1/nested/T", json: &[("/nested/innerId", r#""T""#)], ..ROW },
    // Fix 7. mux.go unescapes the path first and answers a bad escape with
    // 400 INVALID_ARGUMENT, before any route is tried.
    Row { name: "broken path escape", path: "/v1/echo/%zz", status: 400, json: &[("/code", "3")], ..ROW },
    Row { name: "non-UTF-8 path escape", path: "/v1/echo/%C3%28", status: 400, json: &[("/code", "3")], ..ROW },
    // Fix 8. context.go joins every X-Forwarded-For value and appends the peer.
    Row {
        name: "X-Forwarded-For joins all values",
        path: "/v1/echo/x",
        headers: &[("x-forwarded-for", "10.0.0.1"), ("x-forwarded-for", "10.0.0.2")],
        response_headers: &[("grpc-metadata-echo-x-forwarded-for", H::Is("10.0.0.1, 10.0.0.2, 127.0.0.1"))],
        ..ROW
    },
    // errors.go: a 401 carries WWW-Authenticate (grpc-gateway leaves it to
    // the handler; RFC 6750 requires it, so keel always sends it).
    Row {
        name: "401 names the Bearer scheme",
        path: "/v1/echo/a",
        headers: &[("grpc-metadata-echo-status", "16")],
        status: 401,
        response_headers: &[("www-authenticate", H::Is("Bearer"))],
        ..ROW
    },
    // Permanent headers: context.go DefaultHeaderMatcher sends them as
    // grpcgateway-*. Departure: Cookie is not in keel's default list.
    Row {
        name: "permanent headers become grpcgateway-* metadata",
        path: "/v1/echo/p",
        headers: &[("accept-language", "fr"), ("user-agent", "conformance"), ("cookie", "secret")],
        response_headers: &[
            ("grpc-metadata-echo-grpcgateway-accept-language", H::Is("fr")),
            ("grpc-metadata-echo-grpcgateway-user-agent", H::Is("conformance")),
            ("grpc-metadata-echo-grpcgateway-cookie", H::Absent),
        ],
        ..ROW
    },
    // Fix 10. protoc-gen-grpc-gateway's generate_unbound_methods is off by
    // default: no route for an unannotated method.
    Row {
        name: "unannotated methods have no route",
        method: "POST",
        path: "/echo.v1.EchoService/Unannotated",
        body: Some("{}"),
        status: 404,
        ..ROW
    },
    // Unknown fields, `reject` (the default): Envoy's transcoder rejects them;
    // keel names the field. grpc-gateway ignores them: that is `ignore`.
    Row {
        name: "unknown query parameter rejected",
        path: "/v1/echo/u?_=1",
        status: 400,
        json: &[("/message", r#""unknown query parameter \"_\"""#)],
        ..ROW
    },
    Row {
        name: "unknown query parameter ignored",
        setup: Setup::Lenient,
        path: "/v1/echo/u?_=1",
        json: &[("/id", r#""u""#)],
        ..ROW
    },
    Row {
        name: "unknown JSON field ignored",
        setup: Setup::Lenient,
        method: "POST",
        path: "/v1/echo/u",
        body: Some(r#"{"name": "n", "newer": true}"#),
        json: &[("/name", r#""n""#)],
        ..ROW
    },
    Row {
        name: "query parameter bound by the path ignored",
        setup: Setup::Lenient,
        path: "/v1/echo/u?id=other",
        json: &[("/id", r#""u""#)],
        ..ROW
    },
    // marshaler_registry.go: an unknown or missing Content-Type gets the
    // default (JSON) marshaler.
    Row {
        name: "form content type read as JSON",
        method: "POST",
        path: "/v1/echo/c",
        headers: &[("content-type", "application/x-www-form-urlencoded")],
        body: Some(r#"{"name": "form"}"#),
        json: &[("/name", r#""form""#)],
        ..ROW
    },
    Row {
        name: "no content type read as JSON",
        method: "POST",
        path: "/v1/echo/c",
        headers: &[("content-type", "")],
        body: Some(r#"{"name": "none"}"#),
        json: &[("/name", r#""none""#)],
        ..ROW
    },
    Row {
        name: "not JSON: 400 naming the expected type",
        method: "POST",
        path: "/v1/echo/c",
        headers: &[("content-type", "text/plain")],
        body: Some("name=x"),
        status: 400,
        json: &[("/code", "3")],
        ..ROW
    },
    // mux.go answers HEAD for GET routes (WithHealthzEndpoint aside, its
    // router treats HEAD as GET without a body).
    Row {
        name: "HEAD on a GET route",
        method: "HEAD",
        path: "/v1/echo/h",
        response_headers: &[("content-type", H::Is("application/json"))],
        text: Some(""),
        ..ROW
    },
    // Departure: grpc-gateway answers a known path with the wrong method
    // with 501; keel answers 405 with Allow, which HTTP defines for it.
    Row {
        name: "405 with Allow",
        method: "DELETE",
        path: "/v1/echo/h",
        status: 405,
        response_headers: &[("allow", H::Present)],
        json: &[("/code", "12")],
        ..ROW
    },
    // handler.go ForwardResponseMessage: a handler's x-http-code metadata
    // picks the status and is not forwarded.
    Row {
        name: "x-http-code sets the success status",
        method: "POST",
        path: "/v1/echo/k",
        headers: &[("grpc-metadata-echo-http-code", "201")],
        body: Some("{}"),
        status: 201,
        response_headers: &[("grpc-metadata-x-http-code", H::Absent)],
        json: &[("/id", r#""k""#)],
        ..ROW
    },
    Row {
        name: "x-http-code 204 has no body",
        method: "POST",
        path: "/v1/echo/k",
        headers: &[("grpc-metadata-echo-http-code", "204")],
        body: Some("{}"),
        status: 204,
        text: Some(""),
        ..ROW
    },
    // google.api.HttpBody: runtime.HTTPBodyMarshaler writes data raw with
    // the message's content type; a request body bound to one is raw too.
    Row {
        name: "HttpBody request and response",
        method: "POST",
        path: "/v1/upload",
        headers: &[("content-type", "application/octet-stream")],
        body: Some("raw \u{1} bytes"),
        response_headers: &[("content-type", H::Is("application/octet-stream"))],
        text: Some("raw \u{1} bytes"),
        ..ROW
    },
    Row {
        name: "streamed HttpBody response",
        path: "/v1/download?id=text/csv&name=a,b%0A&number=3",
        response_headers: &[("content-type", H::Is("text/csv"))],
        text: Some("a,b\na,b\na,b\n"),
        ..ROW
    },
    // Departure kept: streams are application/x-ndjson (grpc-gateway says
    // application/json for a body that is not one JSON document).
    Row {
        name: "streams are NDJSON",
        path: "/v1/echo:stream?number=1",
        response_headers: &[("content-type", H::Is("application/x-ndjson"))],
        ..ROW
    },
    // CORS (tower-http): off by default, a preflight answered when set.
    Row {
        name: "preflight answered when configured",
        setup: Setup::Cors,
        method: "OPTIONS",
        path: "/v1/echo/o",
        headers: &[("origin", "https://app.example.com"), ("access-control-request-method", "POST")],
        response_headers: &[("access-control-allow-origin", H::Is("https://app.example.com"))],
        ..ROW
    },
    Row {
        name: "no CORS headers by default",
        method: "GET",
        path: "/v1/echo/o",
        headers: &[("origin", "https://app.example.com")],
        response_headers: &[("access-control-allow-origin", H::Absent)],
        ..ROW
    },
];

#[tokio::test]
async fn every_row_behaves_as_grpc_gateway_or_documents_why_not() -> Result<()> {
    let mut failures = Vec::new();
    for setup in [Setup::Default, Setup::Lenient, Setup::Cors] {
        let gw = EchoGateway::start(setup.settings()).await?;
        for row in ROWS.iter().filter(|r| r.setup == setup) {
            if let Err(error) = check(&gw, row).await {
                failures.push(format!("{}: {error:#}", row.name));
            }
        }
        gw.stop().await?;
    }
    if !failures.is_empty() {
        bail!("{} rows failed:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(())
}

async fn check(gw: &EchoGateway, row: &Row) -> Result<()> {
    let method = Method::from_bytes(row.method.as_bytes())?;
    let response = gw.http.send(method, row.path, row.headers, row.body).await?;
    let text = response.text();
    if response.status != StatusCode::from_u16(row.status)? {
        bail!("status {} (expected {}): {text}", response.status, row.status);
    }
    for (name, expected) in row.response_headers {
        let actual = response.header(name);
        match (expected, actual) {
            (H::Is(want), Some(got)) if *want == got => {}
            (H::Present, Some(_)) | (H::Absent, None) => {}
            _ => bail!("header {name}: {actual:?}, expected {expected:?}"),
        }
    }
    if let Some(want) = row.text
        && text != want
    {
        bail!("body {text:?}, expected {want:?}");
    }
    if !row.json.is_empty() {
        let body = response.json()?;
        for (pointer, want) in row.json {
            let got = body.pointer(pointer);
            if *want == "<absent>" {
                if got.is_some() {
                    bail!("{pointer} is {got:?}, expected absent; body {body}");
                }
                continue;
            }
            let want: Value = serde_json::from_str(want).with_context(|| format!("row JSON {want}"))?;
            if got != Some(&want) {
                bail!("{pointer} is {got:?}, expected {want}; body {body}");
            }
        }
    }
    Ok(())
}

/// handler.go: with `TE: trailers`, unary trailers go out as HTTP trailers
/// named Grpc-Trailer-*; without it they are folded into the headers.
#[tokio::test]
async fn unary_trailers_are_http_trailers_when_asked_for() -> Result<()> {
    let gw = EchoGateway::start(HttpSettings::default()).await?;
    let asked = gw.http.send(Method::GET, "/v1/echo/t", &[("te", "trailers")], None).await?;
    assert_eq!(asked.status, StatusCode::OK);
    let trailers = asked.trailers.clone().context("no HTTP trailers")?;
    assert_eq!(trailers.get("grpc-trailer-trailer-note").and_then(|v| v.to_str().ok()), Some("done"));
    assert!(asked.header("grpc-metadata-trailer-note").is_none(), "not folded in as well");
    assert_eq!(asked.json()?["id"], "t");

    let folded = gw.http.get("/v1/echo/t").await?;
    assert_eq!(folded.header("grpc-metadata-trailer-note"), Some("done"));
    assert!(folded.trailers.is_none());
    gw.stop().await
}
