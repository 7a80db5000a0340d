"""Acceptance of auth and request ids against the built binary with grpcurl
and urllib: missing or wrong tokens are UNAUTHENTICATED / 401, health and
reflection need none, and an x-request-id comes back and is logged."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from keelproc import Checks, Keel

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
GRPCURL = os.environ.get("GRPCURL", "grpcurl")
TOKEN = "e2e-token-123"
check = Checks("middleware acceptance")


def grpcurl(keel, *args):
    out = subprocess.run([GRPCURL, "-plaintext", *args[:-1], keel.grpc, args[-1]], capture_output=True, text=True, timeout=30)
    return out.returncode, out.stdout + out.stderr


def http(keel, path, token=None):
    request = urllib.request.Request(f"http://{keel.addrs['http']}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def main():
    keel = Keel(BINARY, env={"KEEL__AUTH__TOKENS": TOKEN})
    try:
        call = ("-d", '{"user_id": "nobody"}', "user.v1.UserService/GetUser")
        code, out = grpcurl(keel, *call)
        check(code != 0 and "Unauthenticated" in out, f"gRPC without a token: {out.strip().splitlines()[-1:]}")
        code, out = grpcurl(keel, "-H", "authorization: Bearer wrong", *call)
        check(code != 0 and "Unauthenticated" in out, "gRPC with a wrong token is Unauthenticated")
        code, out = grpcurl(keel, "-H", f"authorization: Bearer {TOKEN}", *call)
        check("NotFound" in out, "gRPC with the token reaches the service (NotFound)")
        code, out = grpcurl(keel, "list")
        check(code == 0 and "user.v1.UserService" in out, "reflection needs no token")
        code, out = grpcurl(keel, "-d", '{"service": "user.v1.UserService"}', "grpc.health.v1.Health/Check")
        check(code == 0 and "SERVING" in out, "health needs no token")

        status, body = http(keel, "/v1/users/nobody")
        check(status == 401 and json.loads(body).get("code") == 16, f"gateway without a token: {status}")
        status, _ = http(keel, "/v1/users/nobody", "wrong")
        check(status == 401, f"gateway with a wrong token: {status}")
        status, _ = http(keel, "/v1/users/nobody", TOKEN)
        check(status == 404, f"gateway with the token reaches the service: {status}")

        code, out = grpcurl(keel, "-v", "-H", f"authorization: Bearer {TOKEN}", "-H", "x-request-id: e2e-rid-42", *call)
        check("x-request-id: e2e-rid-42" in out, "x-request-id comes back in the response metadata")
    finally:
        keel.stop()
    logged = [line for line in keel.json_logs() if line.get("request_id") == "e2e-rid-42" and line.get("message") == "rpc finished"]
    check(bool(logged), f"the request id appears in a JSON log line: {logged[:1]}")
    check.finish()


if __name__ == "__main__":
    main()
