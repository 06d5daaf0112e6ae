"""Runs tritonclient (the official Triton/KServe v2 client) against a kraken-server and prints what
it saw as JSON, for tools/tests/test_kserve.py. Runs in .venv-clients (tritonclient's pins clash
with the main environment's).

Usage: triton_checks.py HOST:PORT MODEL SCENARIO_JSON
SCENARIO_JSON: {"kind": "metadata" | "infer" | "stream", "headers": {...},
                "requests": [{"id", "inputs": {name: [datatype, value]}}]}
"""
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

NUMPY = {"BYTES": object, "BOOL": bool, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64, "FP32": np.float32,
         "FP64": np.float64}


def make_inputs(spec):
    out = []
    for name, (datatype, value) in spec.items():
        values = value if isinstance(value, list) else [value]
        arr = np.array([values], dtype=NUMPY[datatype])  # shape [1, n]: a batch of one, as the ensemble takes
        t = grpcclient.InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def outputs(result):
    got = {}
    for o in result.get_response().outputs:
        arr = result.as_numpy(o.name)
        got[o.name] = [x.decode() if isinstance(x, bytes) else float(x) for x in arr.flatten()]
    return got


def main():
    target, model, scenario = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = grpcclient.InferenceServerClient(target)
    kind = scenario["kind"]
    if kind == "metadata":
        md = client.get_model_metadata(model)
        cfg = client.get_model_config(model).config
        print(json.dumps({
            "live": client.is_server_live(), "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(model), "other_model_ready": client.is_model_ready("nope"),
            "inputs": {i.name: i.datatype for i in md.inputs}, "outputs": {o.name: o.datatype for o in md.outputs},
            "input_shapes": {i.name: list(i.shape) for i in md.inputs},
            "config_dims": {i.name: list(i.dims) for i in cfg.input},
            "decoupled": cfg.model_transaction_policy.decoupled, "max_batch_size": cfg.max_batch_size,
            "server": client.get_server_metadata().name,
        }))
        return
    if kind == "infer":
        results = []
        for r in scenario["requests"]:
            try:
                wanted = [grpcclient.InferRequestedOutput(n) for n in r.get("outputs", [])] or None
                res = client.infer(r.get("model", model), make_inputs(r["inputs"]), request_id=r["id"],
                                   headers=scenario.get("headers"), outputs=wanted)
                results.append({"id": res.get_response().id, "outputs": outputs(res)})
            except InferenceServerException as e:
                results.append({"id": r["id"], "error": e.message(), "status": e.status()})
            except Exception as e:  # noqa: BLE001 - reported to the test, which decides
                results.append({"id": r["id"], "error": str(e), "status": "exception"})
        print(json.dumps(results))
        return
    # A stream carrying every request at once: the responses of each, in order, and its errors.
    q = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    for r in scenario["requests"]:
        client.async_stream_infer(r.get("model", model), make_inputs(r["inputs"]), request_id=r["id"])
    got = {r["id"]: {"responses": [], "finals": 0, "errors": []} for r in scenario["requests"]}
    ended = 0
    while ended < len(scenario["requests"]):
        result, error = q.get(timeout=60)
        if error is not None:
            # An error response names no id through the client's error path; count it for the
            # first request without an end that expects one.
            rid = next(r["id"] for r in scenario["requests"] if r.get("expect_error") and not got[r["id"]]["errors"])
            got[rid]["errors"].append(error.message())
            ended += 1
            continue
        resp = result.get_response()
        entry = got[resp.id]
        entry["responses"].append(outputs(result))
        if resp.parameters["triton_final_response"].bool_param:
            entry["finals"] += 1
            ended += 1
    client.stop_stream()
    print(json.dumps(got))


if __name__ == "__main__":
    main()
