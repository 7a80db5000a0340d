"""Acceptance of TLS, mTLS, certificate rotation, JWT authentication and the
production switches, with clients keel did not write: grpcurl -cacert,
grpcio ssl_channel_credentials, curl --cacert, and tokens signed by PyJWT
against a JWKS served from this script. Certificates are made here (with
the cryptography package), so no openssl binary is needed."""

import base64
import datetime
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import time

# The refused handshakes below are expected; grpcio need not log each one.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
import jwt  # noqa: E402
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keelproc import Checks, Keel

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
GRPCURL = os.environ.get("GRPCURL", "grpcurl")
SCRATCH = os.path.abspath("target/e2e-security")
check = Checks("security acceptance")
ISSUER = "https://idp.e2e.test"
AUDIENCE = "keel-e2e"


# ---- certificates ----

def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Ca:
    def __init__(self, name):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = subject
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                    critical=True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, cn, sans, client=False):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        return pem(cert), key_pem(key)

    def server(self):
        return self.issue("keel", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])


def write(name, data):
    """Writes a file the kubelet's way: a new file renamed over the old."""
    path = os.path.join(SCRATCH, name)
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)
    return path


def eventually(condition, bound=20.0):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


# ---- clients ----

def health_ok(addr, ca, cert=None, key=None):
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(addr, creds, options=options) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False


def encoded_string_field(number, text):
    data = text.encode()
    return bytes([number << 3 | 2, len(data)]) + data


def user_call(addr, ca, method, token):
    """Calls a UserService method with {user_id: "nobody"}; the status code."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        stub = channel.unary_unary(f"/user.v1.UserService/{method}")
        try:
            stub(encoded_string_field(1, "nobody"), metadata=[("authorization", f"Bearer {token}")], timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


def curl(url, ca, *extra):
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}", "--cacert", ca,
                          *extra, url], capture_output=True, text=True, timeout=30)
    return out.returncode, out.stdout


# ---- JWKS ----

class Jwks:
    """A JWKS on loopback; the document can be replaced, fetches counted."""

    def __init__(self, keys):
        self.document = json.dumps({"keys": keys}).encode()
        self.fetches = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.fetches += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(owner.document)))
                self.end_headers()
                self.wfile.write(owner.document)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"

    def set(self, keys):
        self.document = json.dumps({"keys": keys}).encode()


def rsa_jwk(key, kid):
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return jwk


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides):
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, "scope": "users.read"}
    body.update(overrides)
    return body


# ---- the checks ----

def tls_jwt_and_rotation():
    ca = Ca("e2e CA")
    cert, key = ca.server()
    ca_file = write("ca.crt", pem(ca.cert))
    cert_file, key_file = write("tls.crt", cert), write("tls.key", key)
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = Jwks([rsa_jwk(signing, "k1")])
    config = write("security.yaml", json.dumps({"auth": {"jwt": {
        "issuer": ISSUER, "audiences": [AUDIENCE], "jwks_url": jwks.url, "leeway": "0s",
        "min_refresh_interval": "1ms",
        "required_scopes": {"/user.v1.UserService/DeleteUser": ["users.admin"]},
    }}}).encode())
    env = {}
    for listener in ("GRPC", "HTTP"):
        env[f"KEEL__{listener}__TLS__CERT_FILE"] = cert_file
        env[f"KEEL__{listener}__TLS__KEY_FILE"] = key_file
    keel = Keel(BINARY, env=env, args=["--config", config])
    try:
        grpc_addr, http_addr = keel.grpc, keel.addrs["http"]
        check(health_ok(grpc_addr, pem(ca.cert)), "grpcio over TLS with ssl_channel_credentials: SERVING")
        out = subprocess.run([GRPCURL, "-cacert", ca_file, grpc_addr, "grpc.health.v1.Health/Check"],
                             capture_output=True, text=True, timeout=30)
        check(out.returncode == 0 and "SERVING" in out.stdout, f"grpcurl -cacert: SERVING {out.stderr.strip()}")
        out = subprocess.run([GRPCURL, "-plaintext", grpc_addr, "list"], capture_output=True, text=True, timeout=30)
        check(out.returncode != 0, "plaintext grpcurl against the TLS port fails")
        code, headers = curl(f"https://localhost:{http_addr.rsplit(':', 1)[1]}/healthz", ca_file, "--http2")
        check(code == 0 and headers.endswith("200") and "HTTP/2" in headers, f"curl --cacert --http2 /healthz: {headers[-3:]}")
        code, headers = curl(f"https://127.0.0.1:{http_addr.rsplit(':', 1)[1]}/v1/users/nobody", ca_file, "--http1.1")
        check(code == 0 and "HTTP/1.1 401" in headers, "curl --http1.1 without a token: 401")
        check("x-content-type-options: nosniff" in headers.lower() and "cache-control: no-store" in headers.lower(),
              "the error carries nosniff and no-store")

        # The JWT matrix, tokens signed by PyJWT.
        valid = jwt.encode(claims(), signing, algorithm="RS256", headers={"kid": "k1"})
        check(user_call(grpc_addr, pem(ca.cert), "GetUser", valid) == grpc.StatusCode.NOT_FOUND,
              "a valid RS256 token: the call runs (NOT_FOUND)")
        public_pem = signing.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
        body = b64(json.dumps(claims()).encode())
        hs256 = f"{header}.{body}." + b64(hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
        forged = valid[:-4] + ("AAAA" if not valid.endswith("AAAA") else "BBBB")
        now = int(time.time())
        refused = {
            "expired": jwt.encode(claims(exp=now - 60), signing, algorithm="RS256", headers={"kid": "k1"}),
            "not yet valid": jwt.encode(claims(nbf=now + 600), signing, algorithm="RS256", headers={"kid": "k1"}),
            "wrong issuer": jwt.encode(claims(iss="https://evil.test"), signing, algorithm="RS256", headers={"kid": "k1"}),
            "wrong audience": jwt.encode(claims(aud="other"), signing, algorithm="RS256", headers={"kid": "k1"}),
            "bad signature": forged,
            "alg none": jwt.encode(claims(), None, algorithm="none"),
            "HS256 signed with the public key": hs256,
        }
        for case, token in refused.items():
            got = user_call(grpc_addr, pem(ca.cert), "GetUser", token)
            check(got == grpc.StatusCode.UNAUTHENTICATED, f"{case}: {got.name}")

        before = jwks.fetches
        jwks.set([rsa_jwk(signing, "k1"), rsa_jwk(rotated, "k2")])
        token = jwt.encode(claims(), rotated, algorithm="RS256", headers={"kid": "k2"})
        got = user_call(grpc_addr, pem(ca.cert), "GetUser", token)
        check(got == grpc.StatusCode.NOT_FOUND and jwks.fetches > before,
              f"an unknown kid: JWKS fetched again and accepted ({got.name})")
        got = user_call(grpc_addr, pem(ca.cert), "DeleteUser", valid)
        check(got == grpc.StatusCode.PERMISSION_DENIED, f"a missing scope: {got.name}")
        admin = jwt.encode(claims(scope="users.read users.admin"), signing, algorithm="RS256", headers={"kid": "k1"})
        got = user_call(grpc_addr, pem(ca.cert), "DeleteUser", admin)
        check(got == grpc.StatusCode.NOT_FOUND, f"with the scope: {got.name}")
        url = f"https://localhost:{http_addr.rsplit(':', 1)[1]}/v1/users/nobody"
        _, headers = curl(url, ca_file, "-X", "DELETE", "-H", f"authorization: Bearer {valid}")
        check(headers.endswith("403"), f"a missing scope through the gateway: {headers[-3:]}")
        _, headers = curl(url, ca_file, "-H", f"authorization: Bearer {refused['expired']}")
        check(headers.endswith("401"), f"an expired token through the gateway: {headers[-3:]}")

        # Rotation: another CA's certificate replaces the files.
        next_ca = Ca("e2e CA 2")
        cert, key = next_ca.server()
        write("tls.key", key)
        write("tls.crt", cert)
        check(eventually(lambda: health_ok(grpc_addr, pem(next_ca.cert))),
              "rotated gRPC certificate served without a restart")
        next_file = write("ca2.crt", pem(next_ca.cert))
        check(eventually(lambda: curl(f"https://localhost:{http_addr.rsplit(':', 1)[1]}/healthz", next_file)[1]
                         .endswith("200")), "rotated gateway certificate served without a restart")
        check(not health_ok(grpc_addr, pem(ca.cert)), "the old certificate is no longer served")
    finally:
        keel.stop()


def mtls():
    ca = Ca("mTLS CA")
    cert, key = ca.server()
    client_cert, client_key = ca.issue("orders", [x509.UniformResourceIdentifier("spiffe://e2e/orders")], client=True)
    ca_file = write("mtls-ca.crt", pem(ca.cert))
    env = {}
    for listener in ("GRPC", "HTTP"):
        env[f"KEEL__{listener}__TLS__CERT_FILE"] = write("mtls.crt", cert)
        env[f"KEEL__{listener}__TLS__KEY_FILE"] = write("mtls.key", key)
        env[f"KEEL__{listener}__TLS__CLIENT_CA_FILE"] = ca_file
    keel = Keel(BINARY, env=env)
    try:
        addr, http_port = keel.grpc, keel.addrs["http"].rsplit(":", 1)[1]
        check(health_ok(addr, pem(ca.cert), client_cert, client_key), "grpcio with a client certificate: SERVING")
        check(not health_ok(addr, pem(ca.cert)), "grpcio without a client certificate is refused")
        cert_path, key_path = write("client.crt", client_cert), write("client.key", client_key)
        code, headers = curl(f"https://localhost:{http_port}/healthz", ca_file, "--cert", cert_path, "--key", key_path)
        check(code == 0 and headers.endswith("200"), "curl with a client certificate: 200")
        code, _ = curl(f"https://localhost:{http_port}/healthz", ca_file)
        check(code != 0, f"curl without a client certificate is refused (curl exit {code})")
        named = lambda: any(r.get("target") == "keel::access" and r.get("client") == "spiffe://e2e/orders"  # noqa: E731
                            for r in keel.json_logs())
        check(eventually(named, 10), "the access log names the client")
        out = subprocess.run([BINARY, "healthcheck", "--addr", addr, "--tls", "--ca-file", ca_file,
                              "--server-name", "localhost", "--cert-file", cert_path, "--key-file", key_path],
                             capture_output=True, text=True, timeout=30, env={})
        check(out.returncode == 0, f"keel healthcheck --tls with a client certificate: {out.stderr.strip()}")
    finally:
        keel.stop()


def production_reflection():
    keel = Keel(BINARY, env={"KEEL_ENV": "production", "KEEL__AUTH__TOKENS": "e2e-token"})
    try:
        # With and without a token: a method no service has (reflection,
        # here) is UNIMPLEMENTED for everyone, as grpc-go answers.
        for headers in (["-H", "authorization: Bearer e2e-token"], []):
            out = subprocess.run([GRPCURL, "-plaintext", *headers, keel.grpc, "list"],
                                 capture_output=True, text=True, timeout=30)
            text = (out.stdout + out.stderr).lower()
            check(out.returncode != 0 and ("unimplemented" in text or "does not support the reflection api" in text),
                  f"KEEL_ENV=production: grpcurl list {'with' if headers else 'without'} a token fails "
                  f"as unimplemented ({out.stderr.strip()})")
        with grpc.insecure_channel(keel.grpc) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            check(answer.status == health_pb2.HealthCheckResponse.SERVING, "health still answers")
    finally:
        keel.stop()


def main():
    shutil.rmtree(SCRATCH, ignore_errors=True)
    os.makedirs(SCRATCH)
    tls_jwt_and_rotation()
    mtls()
    production_reflection()
    check.finish()


if __name__ == "__main__":
    main()
