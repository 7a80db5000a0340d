"""Acceptance of the gRPC core with clients keel did not write: Python grpcio
building every message from the server's reflection (v1alpha), grpcurl, and
the binary's config handling."""

import os
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from keelproc import Checks, Keel

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
GRPCURL = os.environ.get("GRPCURL", "grpcurl")
check = Checks("grpc acceptance")


def expect_code(fn, code, what, mentions=None):
    try:
        fn()
    except grpc.RpcError as err:
        ok = err.code() == code and (mentions is None or mentions in (err.details() or ""))
        check(ok, f"{what}: got {err.code().name} {err.details()!r}")
        return
    check(False, f"{what}: call succeeded")


class Dynamic:
    """Message classes and callables built from reflection alone."""

    def __init__(self, channel):
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        self.service = pool.FindServiceByName("user.v1.UserService")
        self.channel = channel

    def message(self, name):
        return message_factory.GetMessageClass(self.service.file.pool.FindMessageTypeByName(name))

    def call(self, method_name):
        method = self.service.methods_by_name[method_name]
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        path = f"/{self.service.full_name}/{method.name}"
        if method.server_streaming:
            stub = self.channel.unary_stream(path, request.SerializeToString, response.FromString)
        else:
            stub = self.channel.unary_unary(path, request.SerializeToString, response.FromString)
        return request, stub


def grpc_flow(keel):
    channel = grpc.insecure_channel(keel.grpc)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "user.v1.UserService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        check(status == health_pb2.HealthCheckResponse.SERVING, f"health {service!r} is SERVING")
    expect_code(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5),
                grpc.StatusCode.NOT_FOUND, "health of an unknown service")

    api = Dynamic(channel)
    User = api.message("user.v1.User")
    Create, create = api.call("CreateUser")
    Get, get = api.call("GetUser")
    Update, update = api.call("UpdateUser")
    Delete, delete = api.call("DeleteUser")
    List, list_users = api.call("ListUsers")
    Watch, watch = api.call("WatchUsers")

    # A watcher started before the changes must see the create and the delete.
    events = []
    watch_call = watch(Watch(), timeout=30)

    def consume():
        try:
            for event in watch_call:
                events.append((event.kind, event.user.user_id))
        except grpc.RpcError:
            pass

    watcher = threading.Thread(target=consume, daemon=True)
    watcher.start()
    # The server subscribes before it sends its headers, so once they have
    # arrived every later change is seen.
    watch_call.initial_metadata()

    ada = create(Create(user=User(user_id="ada", display_name="Ada", email="ada@example.com", roles=["admin"])), timeout=5)
    check(ada.user_id == "ada" and ada.create_time.seconds > 0 and ada.update_time == ada.create_time,
          "CreateUser sets create_time and update_time")
    gen = create(Create(user=User(display_name="Gen", email="gen@example.com")), timeout=5)
    check(len(gen.user_id) > 0, f"CreateUser generates an id ({gen.user_id})")
    expect_code(lambda: create(Create(user=User(user_id="ada", display_name="A", email="a@b")), timeout=5),
                grpc.StatusCode.ALREADY_EXISTS, "duplicate id")
    expect_code(lambda: create(Create(user=User(display_name="", email="a@b")), timeout=5),
                grpc.StatusCode.INVALID_ARGUMENT, "empty display_name", mentions="display_name")
    expect_code(lambda: create(Create(user=User(display_name="X", email="nope")), timeout=5),
                grpc.StatusCode.INVALID_ARGUMENT, "email without @", mentions="email")

    fetched = get(Get(user_id="ada"), timeout=5)
    check(fetched == ada, "GetUser returns the created user")
    expect_code(lambda: get(Get(user_id="ghost"), timeout=5), grpc.StatusCode.NOT_FOUND, "GetUser of an unknown id")

    patched = update(Update(user=User(user_id="ada", display_name="Ada L."),
                            update_mask={"paths": ["display_name"]}), timeout=5)
    check(patched.display_name == "Ada L." and patched.email == "ada@example.com" and list(patched.roles) == ["admin"],
          "UpdateUser with a mask changes only the masked path")
    replaced = update(Update(user=User(user_id="ada", display_name="Ada R", email="r@example.com")), timeout=5)
    check(replaced.email == "r@example.com" and list(replaced.roles) == [],
          "UpdateUser with an empty mask replaces every mutable field")
    expect_code(lambda: update(Update(user=User(user_id="ada", display_name="Z"),
                                      update_mask={"paths": ["shoe_size"]}), timeout=5),
                grpc.StatusCode.INVALID_ARGUMENT, "unknown mask path", mentions="shoe_size")

    for uid in ("c", "a", "b"):
        create(Create(user=User(user_id=uid, display_name=uid, email=f"{uid}@example.com")), timeout=5)
    ids = [u.user_id for u in list_users(List(), timeout=5)]
    check(ids == sorted(ids) and {"a", "b", "c", "ada", gen.user_id} <= set(ids), f"ListUsers ordered by id: {ids}")

    delete(Delete(user_id="c"), timeout=5)
    expect_code(lambda: delete(Delete(user_id="c"), timeout=5), grpc.StatusCode.NOT_FOUND, "DeleteUser twice")

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(k == 3 and uid == "c" for k, uid in events):
        time.sleep(0.05)
    check((1, "ada") in events, f"WatchUsers saw the create of ada ({len(events)} events)")
    check((3, "c") in events, "WatchUsers saw the delete of c")
    watch_call.cancel()
    watcher.join(5)

    expect_code(lambda: list(watch(Watch(), timeout=0.5)), grpc.StatusCode.DEADLINE_EXCEEDED,
                "WatchUsers ends at its deadline")


def grpcurl_list(keel):
    out = subprocess.run([GRPCURL, "-plaintext", keel.grpc, "list"], capture_output=True, text=True, timeout=20)
    services = out.stdout.split()
    check("user.v1.UserService" in services and "grpc.health.v1.Health" in services,
          f"grpcurl list shows the services: {services}")
    for svc in ("", "user.v1.UserService"):
        args = [GRPCURL, "-plaintext", "-d", '{"service": "%s"}' % svc, keel.grpc, "grpc.health.v1.Health/Check"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=20)
        check('"SERVING"' in out.stdout, f"grpcurl health {svc!r}: {out.stdout.strip()}")


def config_checks():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL")}
    with tempfile.TemporaryDirectory() as scratch:
        env["KEEL_CONFIG_DIR"] = scratch
        bad = [
            ({"KEEL__GRPC__ADDR": "nowhere:port"}, "grpc.addr"),
            ({"KEEL__LOG__FORMAT": "xml"}, "log.format"),
            ({"KEEL__SHUTDOWN__DRAIN_DELAY": "5 parsecs"}, "shutdown.drain_delay"),
            ({"KEEL__STREAMS__WATCH_BUFER": "3"}, "streams.watch_bufer"),
        ]
        for extra, key in bad:
            out = subprocess.run([BINARY, "config"], env={**env, **extra}, capture_output=True, text=True, timeout=20)
            check(out.returncode == 78 and key in out.stderr, f"bad {key} exits 78 naming it: {out.stderr.strip()}")
        typo = os.path.join(scratch, "typo.yaml")
        with open(typo, "w") as f:
            f.write("grpc:\n  adress: 0.0.0.0:9000\n")
        out = subprocess.run([BINARY, "--config", typo, "config"], env=env, capture_output=True, text=True, timeout=20)
        check(out.returncode == 78 and "grpc.adress" in out.stderr, f"typo in a file exits 78: {out.stderr.strip()}")

        layered = os.path.join(scratch, "layered.yaml")
        with open(layered, "w") as f:
            f.write("grpc:\n  addr: 127.0.0.1:7000\nauth:\n  tokens: [file-token-secret]\n")
        out = subprocess.run([BINARY, "--config", layered, "config"],
                             env={**env, "KEEL__GRPC__ADDR": "127.0.0.1:7100", "KEEL__AUTH__TOKENS": "env-token-secret"},
                             capture_output=True, text=True, timeout=20)
        check(out.returncode == 0 and "127.0.0.1:7100" in out.stdout, "env var overrides the file")
        check("secret" not in out.stdout, "keel config never prints a token")


def main():
    keel = Keel(BINARY)
    try:
        grpc_flow(keel)
        grpcurl_list(keel)
    finally:
        code, took = keel.stop()
    check(code == 0, f"SIGTERM exits 0 (took {took:.2f}s)")
    config_checks()
    check.finish()


if __name__ == "__main__":
    main()
