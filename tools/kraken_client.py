#!/usr/bin/env python3
"""Python client for Kraken Serve (grpcio from PyPI), usable as a module and as a command.

    python tools/kraken_client.py "And God said," --max-tokens 32 --stream
    python tools/kraken_client.py --info

As a module:
    from kraken_client import connect, pb
    stub = connect("localhost:8001")
    for msg in stub.Generate(pb.GenerateRequest(text="In the beginning", max_tokens=16)):
        print(msg.text, end="", flush=True)

The Python stubs are generated from proto/kraken/v1/kraken.proto on first use (grpc_tools) into
build/python-proto, so the client always matches the server's API in this checkout.
"""
import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "proto")
OUT_DIR = os.environ.get("KRAKEN_PY_PROTO_DIR", os.path.join(ROOT, "build", "python-proto"))


def _load_stubs():
    proto = os.path.join(PROTO_DIR, "kraken", "v1", "kraken.proto")
    stamp = os.path.join(OUT_DIR, "kraken", "v1", "kraken_pb2.py")
    if not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(proto):
        from grpc_tools import protoc
        os.makedirs(OUT_DIR, exist_ok=True)
        rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}", proto])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        for d in ("kraken", os.path.join("kraken", "v1")):
            open(os.path.join(OUT_DIR, d, "__init__.py"), "a").close()
    if OUT_DIR not in sys.path:
        sys.path.insert(0, OUT_DIR)
    return importlib.import_module("kraken.v1.kraken_pb2"), importlib.import_module("kraken.v1.kraken_pb2_grpc")


pb, pb_grpc = _load_stubs()


def connect(target="localhost:8001", api_key=None, root_cert=None):
    """Returns a KrakenStub. With root_cert (PEM bytes) the channel uses TLS; with api_key every call
    carries 'authorization: Bearer <key>'."""
    import grpc
    if root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
        if api_key:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(api_key))
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
        if api_key:
            class _Auth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
                def _add(self, details):
                    md = list(details.metadata or []) + [("authorization", f"Bearer {api_key}")]
                    return details._replace(metadata=md)

                def intercept_unary_unary(self, cont, details, req):
                    return cont(self._add(details), req)

                def intercept_unary_stream(self, cont, details, req):
                    return cont(self._add(details), req)
            channel = grpc.intercept_channel(channel, _Auth())
    return pb_grpc.KrakenStub(channel)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", nargs="?")
    ap.add_argument("--target", default="localhost:8001")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stop", action="append", default=[])
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--info", action="store_true", help="print GetModelInfo and exit")
    ap.add_argument("--api-key")
    a = ap.parse_args()
    stub = connect(a.target, a.api_key)
    if a.info or a.prompt is None:
        print(stub.GetModelInfo(pb.GetModelInfoRequest()))
        return
    req = pb.GenerateRequest(text=a.prompt, stop=a.stop)
    if a.max_tokens is not None:
        req.max_tokens = a.max_tokens
    if a.temperature is not None:
        req.temperature = a.temperature
    if a.seed is not None:
        req.seed = a.seed
    if a.stream:
        last = None
        for msg in stub.Generate(req):
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            last = msg
        t = last.timings
        print(f"\n[{pb.FinishReason.Name(last.finish_reason)}; {last.usage.completion_tokens} tokens; "
              f"TTFT {t.ttft_seconds * 1e3:.1f} ms; e2e {t.e2e_seconds * 1e3:.1f} ms]", file=sys.stderr)
    else:
        r = stub.Complete(req)
        print(r.text)
        print(f"[{pb.FinishReason.Name(r.finish_reason)}; {r.usage.completion_tokens} tokens]", file=sys.stderr)


if __name__ == "__main__":
    main()
