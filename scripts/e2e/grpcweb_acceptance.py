"""Acceptance of gRPC-Web on the HTTP port with a client keel did not write:
Python's sonora, calling UserService's unary and server-streaming methods
with auth on, so the call provably runs the gRPC layer stack. Also the
gateway settings that need their own process: CORS preflights and
http.unknown_fields: ignore.

sonora pins urllib3 < 2, so it gets its own venv (target/e2e-grpcweb-venv,
pinned below); run.sh's venv starts this script, which re-runs itself there.
Message classes are generated from proto/ with grpcio-tools in that venv."""

import os
import subprocess
import sys
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VENV = os.environ.get("KEEL_GRPCWEB_VENV", os.path.join(ROOT, "target", "e2e-grpcweb-venv"))
# Pinned, so CI runs the versions checked here; bump together and rerun.
PACKAGES = ["sonora==0.2.3", "urllib3==1.26.20", "grpcio==1.85.3", "grpcio-tools==1.85.1", "protobuf==7.36.2"]
BINARY = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "keel"))


def ensure_venv():
    """Re-runs this script inside the sonora venv, creating it first."""
    python = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    stamp = os.path.join(VENV, ".pinned")
    pinned = " ".join(PACKAGES)
    current = open(stamp).read() if os.path.exists(stamp) else ""
    if not os.path.exists(python) or current != pinned:
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *PACKAGES], check=True)
        with open(stamp, "w") as f:
            f.write(pinned)
    os.execv(python, [python, os.path.abspath(__file__), BINARY])


def generate():
    out = os.path.join(ROOT, "target", "e2e-grpcweb-gen")
    os.makedirs(out, exist_ok=True)
    proto = os.path.join(ROOT, "proto")
    files = ["user/v1/user.proto", "google/api/annotations.proto", "google/api/http.proto", "keel/auth/v1/options.proto"]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto}", f"--python_out={out}", *files], check=True)
    sys.path.insert(0, out)


def http(addr, method, path, body=None, headers=None):
    request = urllib.request.Request(f"http://{addr}{path}", data=body, method=method)
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def grpc_web(check, Keel):
    import sonora.client
    from sonora.protocol import WebRpcError
    from user.v1 import user_pb2

    token = "grpcweb-e2e-token"
    keel = Keel(BINARY, env={"KEEL__AUTH__TOKENS": token})
    auth = [("authorization", f"Bearer {token}")]
    try:
        addr = keel.addrs["http"]
        with sonora.client.insecure_web_channel(f"http://{addr}") as channel:
            def method(name, request, response, streaming=False):
                make = channel.unary_stream if streaming else channel.unary_unary
                return make(f"/user.v1.UserService/{name}", request.SerializeToString, response.FromString)

            create = method("CreateUser", user_pb2.CreateUserRequest, user_pb2.User)
            get = method("GetUser", user_pb2.GetUserRequest, user_pb2.User)
            listing = method("ListUsers", user_pb2.ListUsersRequest, user_pb2.User, streaming=True)

            for uid in ("web-b", "web-a"):
                user = user_pb2.User(user_id=uid, display_name=uid.upper(), email=f"{uid}@example.com")
                created = create(user_pb2.CreateUserRequest(user=user), metadata=auth)
                check(created.user_id == uid, f"CreateUser over gRPC-Web: {created.user_id}")

            fetched = get(user_pb2.GetUserRequest(user_id="web-a"), metadata=auth)
            check(fetched.display_name == "WEB-A" and fetched.create_time.seconds > 0,
                  f"GetUser over gRPC-Web: {fetched.display_name}")

            ids = [u.user_id for u in listing(user_pb2.ListUsersRequest(), metadata=auth)]
            check(ids == ["web-a", "web-b"], f"ListUsers streams over gRPC-Web: {ids}")

            try:
                get(user_pb2.GetUserRequest(user_id="ghost"), metadata=auth)
                check(False, "GetUser of an unknown user failed")
            except WebRpcError as err:
                check(err.code().name == "NOT_FOUND", f"an unknown user is NOT_FOUND: {err.code()}")

            # The same auth layer as gRPC: no token, no call.
            try:
                get(user_pb2.GetUserRequest(user_id="web-a"))
                check(False, "a call without a token failed")
            except WebRpcError as err:
                check(err.code().name == "UNAUTHENTICATED", f"no token is UNAUTHENTICATED: {err.code()}")
    finally:
        code, _ = keel.stop()
    check(code == 0, "exit 0 after SIGTERM")


def settings(check, Keel):
    keel = Keel(BINARY, env={
        "KEEL__AUTH__DISABLED": "true",
        "KEEL__HTTP__UNKNOWN_FIELDS": "ignore",
        "KEEL__HTTP__CORS__ALLOWED_ORIGINS": "https://app.example.com",
    })
    try:
        addr = keel.addrs["http"]
        body = b'{"user_id": "u1", "display_name": "U", "email": "u@example.com"}'
        status, _, _ = http(addr, "POST", "/v1/users", body, {"Content-Type": "application/json"})
        check(status == 200, f"create u1: {status}")
        status, _, data = http(addr, "GET", "/v1/users/u1?_=1")
        check(status == 200, f"with unknown_fields: ignore, ?_=1 is 200: {status} {data[:200]!r}")
        status, headers, _ = http(addr, "OPTIONS", "/v1/users/u1", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"})
        check(status == 200 and headers.get("access-control-allow-origin") == "https://app.example.com",
              f"a CORS preflight is answered: {status} {headers}")
        status, headers, _ = http(addr, "GET", "/v1/users/u1", headers={"Origin": "https://evil.example.com"})
        check("access-control-allow-origin" not in headers, f"other origins get no CORS grant: {headers}")
    finally:
        code, _ = keel.stop()
    check(code == 0, "exit 0 after SIGTERM")


def main():
    ensure_venv()
    sys.path.insert(0, HERE)
    from keelproc import Checks, Keel

    check = Checks("gRPC-Web acceptance")
    generate()
    grpc_web(check, Keel)
    settings(check, Keel)
    check.finish()


if __name__ == "__main__":
    main()
