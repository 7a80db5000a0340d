"""Acceptance of the HTTP/JSON gateway against the built binary with an
ordinary HTTP client (urllib), and of /openapi.json with
openapi-spec-validator."""

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from keelproc import Checks, Keel

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
check = Checks("gateway acceptance")


class Http:
    def __init__(self, addr):
        self.base = f"http://{addr}"

    def call(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            request.add_header(k, v)
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()

    def json(self, method, path, body=None, headers=None, raw=None):
        status, headers_out, data = self.call(method, path, body, headers, raw)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, {"unparsed": data.decode(errors="replace")}


RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def crud(http):
    status, created = http.json("POST", "/v1/users", {"user_id": "ada", "display_name": "Ada", "email": "ada@example.com"})
    check(status == 200, f"POST /v1/users -> {status}")
    check(sorted(created) == ["create_time", "display_name", "email", "roles", "update_time", "user_id"],
          f"JSON keys equal the proto field names: {sorted(created)}")
    check(created.get("roles") == [], "roles comes back as []")
    check(bool(RFC3339.match(created.get("create_time", ""))), f"create_time is RFC 3339: {created.get('create_time')}")

    status, fetched = http.json("GET", "/v1/users/ada")
    check(status == 200 and fetched == created, "GET /v1/users/ada returns the user")

    status, patched = http.json("PATCH", "/v1/users/ada", {"display_name": "Bob"})
    check(status == 200 and patched["display_name"] == "Bob" and patched["email"] == "ada@example.com",
          "PATCH changes only the sent keys")

    # grpc-gateway's query form of a mask: proto names, comma-separated.
    status, patched = http.json("PATCH", "/v1/users/ada?update_mask=display_name", {"display_name": "Ada L."})
    check(status == 200 and patched.get("display_name") == "Ada L.", f"PATCH ?update_mask=display_name: {status} {patched}")
    status, headers, data = http.call("HEAD", "/v1/users/ada")
    check(status == 200 and data == b"" and headers.get("content-type") == "application/json", f"HEAD on a GET route: {status}")
    # curl -d sends application/x-www-form-urlencoded; the body is read as JSON.
    status, created = http.json("POST", "/v1/users", raw=b'{"user_id": "form", "display_name": "F", "email": "f@example.com"}',
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    check(status == 200 and created.get("user_id") == "form", f"a form-typed JSON body creates the user: {status} {created}")

    status, deleted = http.json("DELETE", "/v1/users/ada")
    check(status == 200 and deleted == {}, f"DELETE returns {{}}: {deleted}")


def errors(http):
    status, body = http.json("GET", "/v1/users/ghost")
    check(status == 404 and body.get("code") == 5 and "details" in body, f"unknown user -> 404 {body}")
    http.json("POST", "/v1/users", {"user_id": "dup", "display_name": "D", "email": "d@example.com"})
    status, body = http.json("POST", "/v1/users", {"user_id": "dup", "display_name": "D", "email": "d@example.com"})
    check(status == 409 and body.get("code") == 6, f"duplicate -> 409 {body}")
    status, body = http.json("POST", "/v1/users", {"display_name": "X", "email": "nope"})
    check(status == 400 and "email" in body.get("message", ""), f"bad email -> 400 naming email {body}")
    status, body = http.json("POST", "/v1/users", {"display_name": "X", "email": "x@y", "favourite_colour": "red"})
    check(status == 400 and "favourite_colour" in body.get("message", ""), f"unknown field -> 400 naming it {body}")
    status, body = http.json("POST", "/v1/users", raw=b'{"display_name": ')
    check(status == 400 and body.get("code") == 3, f"malformed JSON -> 400 {body}")
    status, body = http.json("POST", "/v1/users", raw=b"hello", headers={"Content-Type": "text/plain"})
    check(status == 400 and "application/json" in body.get("message", ""),
          f"text/plain that is not JSON -> 400 naming application/json {body}")
    status, headers, _ = http.call("GET", "/v1/users/ghost", headers={"X-Request-Id": "req-404"})
    check(status == 404 and headers.get("grpc-metadata-x-request-id") == "req-404",
          f"a 404 carries Grpc-Metadata-X-Request-Id: {headers}")
    status, body = http.json("GET", "/v1/users/dup?_=1")
    check(status == 400 and '"_"' in body.get("message", ""), f"unknown query parameter -> 400 naming _ {body}")
    status, body = http.json("GET", "/v2/nowhere")
    check(status == 404 and body.get("code") == 5, f"unknown route -> 404 {body}")
    status, body = http.json("PUT", "/v1/users/x")
    check(status == 405, f"wrong method -> 405 {body}")


def live_streams(keel):
    with urllib.request.urlopen(f"http://{keel.addrs['admin']}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("keel_grpc_live_streams "):
                return float(line.split()[1])
    return 0.0


def streams(http, keel):
    for uid in ("s3", "s1", "s2"):
        http.json("POST", "/v1/users", {"user_id": uid, "display_name": uid, "email": f"{uid}@example.com"})
    status, headers, data = http.call("GET", "/v1/users")
    lines = [json.loads(line) for line in data.decode().splitlines() if line]
    ids = [line["result"]["user_id"] for line in lines]
    check(status == 200 and headers.get("content-type") == "application/x-ndjson" and ids == sorted(ids) and "s1" in ids,
          f"GET /v1/users as NDJSON: {ids}")
    status, headers, data = http.call("GET", "/v1/users", headers={"Accept": "text/event-stream"})
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]
    check(status == 200 and headers.get("content-type") == "text/event-stream" and len(events) == len(ids),
          f"GET /v1/users as SSE: {len(events)} events")

    def create_later():
        # Wait until the watch's server-side stream is running, then change.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and live_streams(keel) < 1:
            time.sleep(0.01)
        http.json("POST", "/v1/users", {"user_id": "watched", "display_name": "W", "email": "w@example.com"})

    threading.Thread(target=create_later, daemon=True).start()
    started = time.monotonic()
    status, _, data = http.call("GET", "/v1/users:watch", headers={"Grpc-Timeout": "2S"})
    took = time.monotonic() - started
    lines = [json.loads(line) for line in data.decode().splitlines() if line]
    created = [l for l in lines if "result" in l and l["result"]["user"]["user_id"] == "watched"]
    check(status == 200 and len(created) == 1, f"watch delivered the create ({len(lines)} lines)")
    check(lines and lines[-1].get("error", {}).get("code") == 4, f"watch ended with an error line code 4: {lines[-1:]}")
    check(1.5 < took < 6, f"watch ended at its 2S deadline ({took:.2f}s)")


def health_and_openapi(http, keel):
    status, body = http.json("GET", "/healthz")
    check(status == 200 and body.get("status") == "SERVING", f"/healthz -> 200 {body}")
    status, body = http.json("GET", "/healthz?service=no.such.Service")
    check(status == 404, f"/healthz unknown service -> 404 {body}")
    status, _, data = http.call("GET", "/openapi.json")
    path = "target/e2e-openapi.json"
    with open(path, "wb") as f:
        f.write(data)
    validator = sys.executable.replace("/python", "/openapi-spec-validator")
    out = subprocess.run([validator, path], capture_output=True, text=True)
    check(status == 200 and out.returncode == 0, f"openapi-spec-validator: {out.stdout.strip()} {out.stderr.strip()[-300:]}")


def main():
    keel = Keel(BINARY)
    http = Http(keel.addrs["http"])
    try:
        crud(http)
        errors(http)
        streams(http, keel)
        health_and_openapi(http, keel)
    finally:
        code, _ = keel.stop()
    check(code == 0, "exit 0 after SIGTERM")
    check.finish()


if __name__ == "__main__":
    main()
