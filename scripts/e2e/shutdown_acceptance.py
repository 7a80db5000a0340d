"""Acceptance of graceful shutdown against the built binary with a Python
grpcio client and real signals: NOT_SERVING first, unary calls served
through the drain delay, every WatchUsers stream ended with UNAVAILABLE, and
the time bounds; a second SIGTERM; an idle exit without a drain delay."""

import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from keelproc import Checks, Keel

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
check = Checks("shutdown acceptance")


def status_of(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def methods(channel):
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("user.v1.UserService")

    def stub(name):
        method = service.methods_by_name[name]
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        path = f"/user.v1.UserService/{name}"
        factory = channel.unary_stream if method.server_streaming else channel.unary_unary
        return request, factory(path, request.SerializeToString, response.FromString)

    return stub


def drain_under_load():
    keel = Keel(BINARY, env={"KEEL__SHUTDOWN__DRAIN_DELAY": "1s", "KEEL__SHUTDOWN__TIMEOUT": "3s"})
    channel = grpc.insecure_channel(keel.grpc)
    stub = methods(channel)
    Create, create = stub("CreateUser")
    User = Create.DESCRIPTOR.fields_by_name["user"].message_type._concrete_class
    create(Create(user=User(user_id="load", display_name="L", email="l@example.com")), timeout=5)
    Get, get = stub("GetUser")
    Watch, watch = stub("WatchUsers")

    health_events = []
    health_stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    def follow_health():
        try:
            for response in health_stream:
                health_events.append((time.monotonic(), response.status))
        except grpc.RpcError:
            pass

    threading.Thread(target=follow_health, daemon=True).start()

    stream_codes = []
    streams = [watch(Watch()) for _ in range(5)]

    def drain(call):
        try:
            for _ in call:
                pass
            stream_codes.append("ended without status")
        except grpc.RpcError as err:
            stream_codes.append(err.code())

    readers = [threading.Thread(target=drain, args=(c,), daemon=True) for c in streams]
    for reader in readers:
        reader.start()

    results = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                get(Get(user_id="load"), timeout=5)
                results.append((time.monotonic(), "OK"))
            except grpc.RpcError as err:
                results.append((time.monotonic(), err.code().name))

    loaders = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for loader in loaders:
        loader.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (health_events and len(results) > 10):
        time.sleep(0.01)

    signalled = time.monotonic()
    keel.signal(signal.SIGTERM)
    while time.monotonic() < signalled + 2 and not any(s == health_pb2.HealthCheckResponse.NOT_SERVING for _, s in health_events):
        time.sleep(0.005)
    flipped = [t for t, s in health_events if s == health_pb2.HealthCheckResponse.NOT_SERVING]
    check(bool(flipped) and flipped[0] - signalled < 0.5,
          f"health NOT_SERVING after {((flipped[0] - signalled) * 1000) if flipped else -1:.0f} ms")
    admin = f"http://{keel.addrs['admin']}"
    check(status_of(admin + "/readyz") == 503, "/readyz is 503 during the delay")
    check(status_of(admin + "/livez") == 200, "/livez is 200 during the delay")

    code = keel.proc.wait(15)
    took = time.monotonic() - signalled
    stop.set()
    for thread in loaders + readers:
        thread.join(5)
    check(code == 0, f"exit code {code}")
    check(1.0 <= took < 5.5, f"exit after {took:.2f}s (want >= 1s and < 5.5s)")
    during = [r for t, r in results if signalled + 0.05 < t < signalled + 0.95 and r == "OK"]
    check(len(during) > 0, f"{len(during)} unary successes during the drain delay")
    other = {r for _, r in results if r not in ("OK", "UNAVAILABLE")}
    check(not other, f"no unary error besides UNAVAILABLE (saw {sorted(other) or 'none'})")
    check(len(stream_codes) == 5 and all(c == grpc.StatusCode.UNAVAILABLE for c in stream_codes),
          f"all 5 WatchUsers streams ended UNAVAILABLE: {stream_codes}")
    channel.close()


def second_signal():
    keel = Keel(BINARY, env={"KEEL__SHUTDOWN__DRAIN_DELAY": "10s"})
    keel.signal(signal.SIGTERM)
    admin = f"http://{keel.addrs['admin']}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and status_of(admin + "/readyz") != 503:
        time.sleep(0.01)
    started = time.monotonic()
    keel.signal(signal.SIGTERM)
    code = keel.proc.wait(10)
    took = time.monotonic() - started
    check(code != 0 and took < 1.0, f"a second SIGTERM exits {code} within {took:.2f}s")


def idle_exit():
    keel = Keel(BINARY, env={"KEEL__SHUTDOWN__DRAIN_DELAY": "0s"})
    started = time.monotonic()
    keel.signal(signal.SIGTERM)
    code = keel.proc.wait(10)
    took = time.monotonic() - started
    check(code == 0 and took < 0.5, f"idle exit {code} in {took * 1000:.0f} ms")


def main():
    drain_under_load()
    second_signal()
    idle_exit()
    check.finish()


if __name__ == "__main__":
    main()
