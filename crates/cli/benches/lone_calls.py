#!/usr/bin/env python3
"""Lone calls from an external client: GetContext, AppendContext and SendMessage (echo),
one at a time, from Python's grpcio, against a running coordinator. Prints each call's
median and 90th percentile, in rounds that alternate the calls.

    pip install grpcio grpcio-tools
    python3 crates/cli/benches/lone_calls.py 127.0.0.1:50051 [calls per round] [rounds]

The stubs are generated from proto/ into a temporary directory at each run.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")


def stubs():
    out = tempfile.mkdtemp(prefix="switchyard-stubs-")
    proto = os.path.join(ROOT, "proto")
    files = [os.path.join(proto, "switchyard", "v1", name)
             for name in ("session.proto", "admin.proto", "membership.proto")]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto}",
                    f"--python_out={out}", f"--grpc_python_out={out}", *files], check=True)
    for package in ("switchyard", os.path.join("switchyard", "v1")):
        open(os.path.join(out, package, "__init__.py"), "a").close()
    sys.path.insert(0, out)


def main():
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    stubs()
    import grpc
    from switchyard.v1 import session_pb2 as pb
    from switchyard.v1 import session_pb2_grpc as rpc

    stub = rpc.SessionServiceStub(grpc.insecure_channel(address))
    created = stub.CreateSession(pb.CreateSessionRequest(user_id="lone-" + uuid.uuid4().hex[:8]))
    session_id = created.session.session_id
    metadata = [("x-session-token", created.token)]
    message = pb.Message(role="user", content="x" * 100)
    stub.AppendContext(pb.AppendContextRequest(session_id=session_id, messages=[message] * 10),
                       metadata=metadata)

    def get_context():
        stub.GetContext(pb.GetContextRequest(session_id=session_id, last_n=10), metadata=metadata)

    def append_context():
        stub.AppendContext(pb.AppendContextRequest(session_id=session_id, messages=[message],
                                                   request_id=uuid.uuid4().hex), metadata=metadata)

    def send_message():
        request = pb.SendMessageRequest(session_id=session_id, agent_type="echo", content="x" * 100,
                                        request_id=uuid.uuid4().hex)
        for _ in stub.SendMessage(request, metadata=metadata):
            pass

    medians = {}
    for round_ in range(rounds):
        for name, call in (("GetContext", get_context), ("AppendContext", append_context),
                           ("SendMessage", send_message)):
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                call()
                times.append((time.perf_counter() - started) * 1e6)
            times.sort()
            p50, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
            medians.setdefault(name, []).append(p50)
            print(f"round {round_ + 1}  {name:14} p50 {p50:8.0f} µs  p90 {p90:8.0f} µs")
    print()
    for name, values in medians.items():
        print(f"{name:14} median of the rounds' p50: {statistics.median(values):8.0f} µs")
    print(f"SendMessage / AppendContext: "
          f"{statistics.median(medians['SendMessage']) / statistics.median(medians['AppendContext']):.2f}")


if __name__ == "__main__":
    main()
