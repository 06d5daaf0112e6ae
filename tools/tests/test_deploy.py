"""Deployment, validated offline: every Kustomize overlay renders, every object validates against
the Kubernetes schemas (kubernetes-validate) or its CRD's published schema (deploy/k8s/crds), the
YAML passes yamllint, and the rendered objects agree with the server: ports, health service, GPU
count, /dev/shm size, grace period. The Dockerfiles get a structural check (no Docker engine here):
multi-stage, pinned bases, non-root user, exec-form entrypoint, cleaned apt lists, and runtime
packages that cover every shared library the built kraken-server links."""
import json
import os
import re
import shutil
import subprocess
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving import BUILD, DEFAULT_MODEL, ROOT, SERVER_BIN

DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
OVERLAYS = ["cpu-dev", "dgx-h100", "dgx-h100-multinode"]
K8S_VERSION = "1.31"
CRDS = {}
for name in os.listdir(os.path.join(K8S, "crds")):
    if name.endswith(".yaml"):
        with open(os.path.join(K8S, "crds", name)) as f:
            crd = yaml.safe_load(f)
        for v in crd["spec"]["versions"]:
            CRDS[(f'{crd["spec"]["group"]}/{v["name"]}', crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]


def crd_validate(obj, schema):
    """Validates against a CRD's openAPIV3Schema. The schema itself is not re-checked as JSON Schema:
    its patterns are Go (RE2) syntax, e.g. a case-insensitive flag mid-pattern, which Python's re
    refuses; none of those fields is used in our objects."""
    jsonschema.Draft202012Validator(schema).validate(obj)


def render(overlay):
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed (kubectl kustomize renders the overlays)")
    out = subprocess.run(["kubectl", "kustomize", os.path.join(K8S, "overlays", overlay)], capture_output=True,
                         text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def pod_templates(objs):
    """(pod template, is the front-end) of every workload."""
    out = []
    for d in by_kind(objs, "Deployment"):
        out.append((d["spec"]["template"], True))
    for lws in by_kind(objs, "LeaderWorkerSet"):
        t = lws["spec"]["leaderWorkerTemplate"]
        out.append((t["leaderTemplate"], True))
        out.append((t["workerTemplate"], False))
    return out


def server_config(objs, container):
    """The server's effective settings: server.toml from the ConfigMap, then KRAKEN_* env."""
    cm = by_kind(objs, "ConfigMap")[0]
    cfg = tomllib.loads(cm["data"]["server.toml"])
    for e in container.get("env", []):
        if e["name"].startswith("KRAKEN_"):
            cfg[e["name"][len("KRAKEN_"):].lower().replace("_", "-")] = e["value"]
    return cfg


def quantity_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(q))
    return int(m.group(1)) * units.get(m.group(2), 1)


def device_count(spec):
    kind, _, rest = spec.partition(":")
    if kind == "cpu":
        return int(rest or 1)
    n = 0
    for part in rest.split(","):
        a, _, b = part.partition("-")
        n += int(b) - int(a) + 1 if b else 1
    return n


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay):
    objs = render(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"} <= kinds
    assert kinds & {"Deployment", "LeaderWorkerSet"}
    for o in objs:
        key = (o["apiVersion"], o["kind"])
        if key in CRDS:
            crd_validate(o, CRDS[key])
        else:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    # LeaderWorkerSet's pod templates: the trimmed CRD leaves them to the core schema.
    for lws in by_kind(objs, "LeaderWorkerSet"):
        for which in ("leaderTemplate", "workerTemplate"):
            tmpl = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": which.lower()},
                    "template": lws["spec"]["leaderWorkerTemplate"][which]}
            kubernetes_validate.validate(tmpl, K8S_VERSION, strict=True)


def test_a_broken_object_is_caught():
    objs = render("cpu-dev")
    dep = by_kind(objs, "Deployment")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight-thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    sm = by_kind(objs, "ServiceMonitor")[0]
    sm["spec"]["endpoints"][0]["interval"] = "every minute"
    with pytest.raises(jsonschema.ValidationError):
        crd_validate(sm, CRDS[("monitoring.coreos.com/v1", "ServiceMonitor")])


def test_yamllint():
    r = subprocess.run(["yamllint", "-c", os.path.join(DEPLOY, ".yamllint"), DEPLOY], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheusrule_is_the_rules_file():
    r = subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"),
                        os.path.join(ROOT, "tools", "deploy", "make_prometheusrule.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def kraken8_model(tmp_path):
    """A config-only Kraken 8-way model directory (what --print-resources reads)."""
    d = tmp_path / "kraken-8way"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "kraken", "kraken_degree": 8, "n_layer": 24, "n_embd": 1024, "n_head_per_sublayer": 16,
        "ffn_expansion": 4, "n_positions": 2048, "vocab_size": 50304, "layer_norm_epsilon": 1e-5, "bias": True,
        "eos_token_id": 50256}))
    return str(d)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_agree_with_the_server(overlay, tmp_path):
    objs = render(overlay)
    svc = by_kind(objs, "Service")[0]
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for tmpl, front_end in pod_templates(objs):
        spec = tmpl["spec"]
        c = spec["containers"][0]
        cfg = server_config(objs, c)
        devices = cfg["devices"]
        # The GPU count equals the devices the server is told to use.
        gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        assert gpus == (device_count(devices) if devices.startswith("cuda") else 0), (overlay, devices, gpus)
        # /dev/shm is memory-backed and at least what the server says this model and world need.
        dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert dshm["emptyDir"]["medium"] == "Memory"
        model = DEFAULT_MODEL if devices.startswith("cpu") else kraken8_model(tmp_path)
        out = subprocess.run([SERVER_BIN, "--model", model, "--devices", devices, "--print-resources",
                              "--max-batch-tokens", str(cfg["max-batch-tokens"]),
                              "--max-batch-seqs", str(cfg["max-batch-seqs"])],
                             capture_output=True, text=True, check=True)
        need = json.loads(out.stdout)
        assert quantity_bytes(dshm["emptyDir"]["sizeLimit"]) >= need["shm_bytes_required"], (overlay, need)
        # Worker threads fit the CPU request (the server would otherwise divide the node's cores).
        cpu_request = float(c["resources"]["requests"]["cpu"])
        assert device_count(devices) * int(cfg["threads-per-worker"]) <= cpu_request, (overlay, cfg)
        # Non-root, read-only root filesystem, no privilege escalation.
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        # The drain fits in the grace period: preStop + server grace + worker shutdown (5 s).
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1]) if front_end else 0
        assert spec["terminationGracePeriodSeconds"] > pre_stop + cfg["grace-period"] + 5
        if not front_end:
            continue
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == cfg["port"] == svc_ports["grpc"]["port"]
        assert ports["metrics"] == cfg["metrics-port"] == svc_ports["metrics"]["port"]
        assert c["startupProbe"]["grpc"]["port"] == cfg["port"]
        assert c["readinessProbe"]["grpc"] == {"port": cfg["port"], "service": "kraken.v1.Kraken"}
        assert c["livenessProbe"]["httpGet"]["port"] == cfg["metrics-port"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
        # The Service selects the front-end pods.
        labels = tmpl["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items() if "worker-index" not in k)
    # The readiness service name is the API's (proto package + service).
    with open(os.path.join(ROOT, "proto", "kraken", "v1", "kraken.proto")) as f:
        proto = f.read()
    assert "package kraken.v1;" in proto and "service Kraken {" in proto
    # The ServiceMonitor scrapes this overlay's Service only, by its metrics port name, and labels
    # the job as the rules expect.
    sm = by_kind(objs, "ServiceMonitor")[0]
    ep = sm["spec"]["endpoints"][0]
    assert ep["port"] == "metrics"
    assert {"targetLabel": "job", "replacement": "kraken"} in ep["relabelings"]
    sel = sm["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/instance" in sel
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items())
    # The PodDisruptionBudget covers this overlay's serving pods only.
    pdb = by_kind(objs, "PodDisruptionBudget")[0]
    assert "app.kubernetes.io/instance" in pdb["spec"]["selector"]["matchLabels"]
    for tmpl, front_end in pod_templates(objs):
        assert tmpl["metadata"]["labels"]["app.kubernetes.io/instance"] == sel["app.kubernetes.io/instance"]
        assert tmpl["spec"]["automountServiceAccountToken"] is False


def test_print_resources_refuses_a_world_the_model_cannot_split():
    r = subprocess.run([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cuda:0-7", "--print-resources"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Kraken degree N = 4 is not a multiple of the world size 8" in r.stderr


def dockerfile_stages(path):
    """[(stage name, [(instruction, args)])] with line continuations joined and comments dropped."""
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            stages.append((m.group(2), [("FROM", m.group(1))]))
        elif stages:
            stages[-1][1].append((instr, args.strip()))
    return stages


def linked_packages():
    """Debian packages providing the shared libraries of the built kraken-server."""
    out = subprocess.run(["ldd", SERVER_BIN], capture_output=True, text=True, check=True).stdout
    pkgs = set()
    for line in out.splitlines():
        m = re.search(r"=> (\S+)", line)
        if not m:
            continue
        real = os.path.realpath(m.group(1))
        r = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True)
        if r.returncode != 0:  # merged /usr: try the /usr/lib spelling
            r = subprocess.run(["dpkg", "-S", real.replace("/lib/", "/usr/lib/", 1)], capture_output=True, text=True)
        if r.returncode == 0:
            pkgs.add(r.stdout.split(":")[0])
    return pkgs - {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}  # in every Debian base image


def apt_packages(run_args):
    return {w for m in re.findall(r"apt-get install ([^&]*)", run_args) for w in m.split() if not w.startswith("-")}


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_structure(name):
    stages = dockerfile_stages(os.path.join(DEPLOY, "docker", name))
    assert len(stages) >= 2 and stages[0][0] == "build" and stages[-1][0] == "runtime"
    for _, instrs in stages:
        base = instrs[0][1]
        assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"
        for instr, args in instrs:
            if instr == "RUN" and "apt-get install" in args:
                assert "--no-install-recommends" in args
                assert "rm -rf /var/lib/apt/lists/*" in args, "apt lists left in the layer"
    final = dict()
    for instr, args in stages[-1][1]:
        final.setdefault(instr, []).append(args)
    user = final["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "the image must run as a numeric non-root user"
    assert json.loads(final["ENTRYPOINT"][-1])[0] == "/usr/local/bin/kraken-server"
    assert set(" ".join(final["EXPOSE"]).split()) == {"8001", "8002"}
    assert all(a.startswith("--from=build") for a in final.get("COPY", [])), "the runtime stage copies only build outputs"
    # Build dependencies are the project's own (scripts/setup.sh); runtime packages cover the binary.
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        setup = f.read()
    build_pkgs = set().union(*(apt_packages(a) for i, a in stages[0][1] if i == "RUN"))
    ours = {p for p in build_pkgs if not re.match(r"(cuda-|libcublas|libnccl|ca-certificates|curl)", p)}
    missing = {p for p in ours if re.search(rf"(^|\s){re.escape(p)}(\s|$)", setup) is None}
    assert not missing, f"build packages not in scripts/setup.sh: {missing}"
    runtime_pkgs = {p.split("=")[0] for p in set().union(*(apt_packages(a) for a in final["RUN"]))}
    if name == "Dockerfile.cpu":
        uncovered = linked_packages() - runtime_pkgs
        assert not uncovered, f"kraken-server links libraries from packages the image lacks: {uncovered}"
    else:
        # The CUDA binary cannot be built here for ldd: the CPU image's packages plus CUDA's.
        cpu_stages = dockerfile_stages(os.path.join(DEPLOY, "docker", "Dockerfile.cpu"))
        cpu_pkgs = set().union(*(apt_packages(a) for i, a in cpu_stages[-1][1] if i == "RUN")) - {"ca-certificates"}
        missing = (cpu_pkgs | {"cuda-cudart-13-0", "libcublas-13-0", "libnccl2"}) - runtime_pkgs
        assert not missing, f"the CUDA image lacks {missing}"
