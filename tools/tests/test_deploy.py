"""Deployment, validated offline: every Kustomize overlay renders, every object validates against
the Kubernetes schemas (kubernetes-validate) or its CRD's published schema (deploy/k8s/crds), the
YAML passes yamllint, and the rendered objects agree with the server: ports, health service, GPU
count, /dev/shm size, grace period. Every container of every overlay runs its real command line
(command/args or the image's ENTRYPOINT/CMD, the image's ENV and its own env, the ConfigMap's
server.toml) through the built kraken-server with --print-resources, so an unknown flag, config
key or KRAKEN_* variable fails here; so does the image's default command. The Dockerfiles get a
structural check (no Docker engine here): multi-stage, pinned bases, non-root user, exec-form
entrypoint, cleaned apt lists, and runtime packages that cover every shared library the built
kraken-server links."""
import json
import os
import re
import shlex
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
            cfg[e["name"][len("KRAKEN_"):].lower().replace("_", "-")] = e.get("value", FIELD_REF.get(
                e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")))
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


def clean_env():
    """This process's environment without KRAKEN_* variables: the server refuses those that name no flag
    (the harness's KRAKEN_BUILD_DIR among them)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_")}


def kraken8_model(tmp_path, degree=8):
    """A config-only Kraken model directory (what --print-resources reads), 8-way unless told."""
    d = tmp_path / f"kraken-{degree}way"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "kraken", "kraken_degree": degree, "n_layer": 24, "n_embd": 1024, "n_head_per_sublayer": 16,
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
                             capture_output=True, text=True, check=True, env=clean_env())
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
        assert ports["http"] == cfg["http-port"] == svc_ports["http"]["port"]
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
                       capture_output=True, text=True, env=clean_env())
    assert r.returncode == 2
    assert "Kraken degree N = 4 is not a multiple of the world size 8" in r.stderr


def cpu_kernel_level():
    """The level kraken-server picks on this CPU: AVX-512 with F/BW/DQ/VL/CD, else AVX2."""
    flags = set(open("/proc/cpuinfo").read().split())
    return "avx512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags else "avx2"


def test_print_resources_names_the_cpu_kernel_level_and_cpu_isa_caps_it():
    def run(*extra, env=None):
        return subprocess.run([SERVER_BIN, "--model", DEFAULT_MODEL, "--devices", "cpu:1", "--print-resources", *extra],
                              capture_output=True, text=True, env={**clean_env(), **(env or {})})
    assert json.loads(run().stdout)["cpu_kernels"] == cpu_kernel_level()
    assert json.loads(run("--cpu-isa", "avx512").stdout)["cpu_kernels"] == cpu_kernel_level()  # a cap, never a raise
    assert json.loads(run("--cpu-isa", "avx2").stdout)["cpu_kernels"] == "avx2"
    # amx and avx512bf16 only when asked for, and only where the CPU has them (else the best level
    # below: avx512bf16 for amx on Zen 4/5).
    flags = set(open("/proc/cpuinfo").read().split())
    bf16 = "avx512_bf16" in flags and cpu_kernel_level() == "avx512"
    amx = {"amx_tile", "amx_bf16"} <= flags and bf16
    bf16_level = "avx512bf16" if bf16 else cpu_kernel_level()
    asked_amx = run("--cpu-isa", "amx")
    assert json.loads(asked_amx.stdout)["cpu_kernels"] == ("amx" if amx else bf16_level)
    if not amx:  # the fallback says why, and what runs instead
        assert "KRAKEN_CPU_ISA=amx: " in asked_amx.stderr and f"; running the {bf16_level} kernels" in asked_amx.stderr
    assert json.loads(run("--cpu-isa", "avx512bf16").stdout)["cpu_kernels"] == bf16_level
    assert json.loads(run(env={"KRAKEN_CPU_ISA": "avx2"}).stdout)["cpu_kernels"] == "avx2"
    # The command line wins over the environment, also when it says auto.
    assert json.loads(run("--cpu-isa", "auto", env={"KRAKEN_CPU_ISA": "avx2"}).stdout)["cpu_kernels"] == cpu_kernel_level()
    bad = run(env={"KRAKEN_CPU_ISA": "avx512fp16"})
    assert bad.returncode == 2
    assert "--cpu-isa: avx512fp16 not in {auto,amx,avx512bf16,avx512,avx2}" in bad.stderr
    assert "environment variable KRAKEN_CPU_ISA" in bad.stderr


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
    assert set(" ".join(final["EXPOSE"]).split()) == {"8000", "8001", "8002"}
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


# --- Each manifest's real command, run against the real binary -----------------------------------
# The tests above build their own command lines; this one runs what a pod would run: the
# container's command/args (or the image's ENTRYPOINT/CMD), the image's ENV overlaid with the
# container's env, and the files the pod mounts (ConfigMaps) or the image holds, with
# --print-resources appended. Paths are translated, never replaced: a file the image holds becomes
# its source in this checkout, a ConfigMap file a temporary copy, a model on a volume a local
# stand-in. An unknown flag, an unknown config key or a bad KRAKEN_* value in any manifest makes
# the server exit 2, and the test fails.

IMAGE_BIN = "/usr/local/bin/kraken-server"
# Set by the LeaderWorkerSet controller in every container of a group (placeholders here).
LWS_ENV = {"LWS_LEADER_ADDRESS": "h100x2-kraken-serve-0.h100x2-kraken-serve.kraken", "LWS_GROUP_SIZE": "2"}
# Downward API values (placeholders of the right shape).
FIELD_REF = {"metadata.name": "kraken-serve-0", "metadata.namespace": "kraken", "metadata.uid": "0000-0000",
             "spec.nodeName": "node-0", "spec.serviceAccountName": "default", "status.hostIP": "10.0.0.1",
             "status.podIP": "10.0.0.2"}


def workload_pods(objs):
    """{(kind, role): pod template}: a Deployment's pods, a LeaderWorkerSet's leader and worker pods."""
    pods = []
    for d in by_kind(objs, "Deployment"):
        pods.append((("Deployment", "pod"), d["spec"]["template"]))
    for lws in by_kind(objs, "LeaderWorkerSet"):
        t = lws["spec"]["leaderWorkerTemplate"]
        pods.append((("LeaderWorkerSet", "leader"), t.get("leaderTemplate", t["workerTemplate"])))
        pods.append((("LeaderWorkerSet", "worker"), t["workerTemplate"]))
    out = dict(pods)
    assert len(out) == len(pods), "two workloads of one kind in an overlay: name them in POD_CASES"
    return out


POD_CASES = [
    ("cpu-dev", "Deployment", "pod"),
    ("dgx-h100", "Deployment", "pod"),
    ("dgx-h100-multinode", "LeaderWorkerSet", "leader"),
    ("dgx-h100-multinode", "LeaderWorkerSet", "worker"),
]


def test_every_pod_template_has_a_command_test():
    """POD_CASES names every workload pod of every overlay, so none escapes the command test."""
    listed = {tuple(c.values) if hasattr(c, "values") else c for c in POD_CASES}
    assert {(o, kind, role) for o in OVERLAYS for kind, role in workload_pods(render(o))} == listed


def k8s_expand(s, env):
    """Kubernetes' $(VAR) expansion: $$ is a literal $, an undefined reference stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def image_runtime(image):
    """(ENTRYPOINT, CMD, ENV, {path in the image: its source here}) of the image's final stage; the
    Dockerfile is found by the image's tag (kraken-serve:cpu -> Dockerfile.cpu)."""
    import shlex
    path = os.path.join(DEPLOY, "docker", f"Dockerfile.{image.rpartition(':')[2]}")
    assert os.path.exists(path), f"no Dockerfile builds image {image}"
    entrypoint, cmd, env, files = None, [], {}, {}
    for instr, args in dockerfile_stages(path)[-1][1]:
        if instr == "ENTRYPOINT":
            entrypoint = json.loads(args)
        elif instr == "CMD":
            cmd = json.loads(args)
        elif instr == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(args))
        elif instr == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            *srcs, dest = words
            for src in srcs:
                local = re.sub(r"^/src/", ROOT + "/", re.sub(r"^/build/", BUILD + "/", src))
                files[os.path.join(dest, os.path.basename(src)) if dest.endswith("/") else dest] = local
    return entrypoint, cmd, env, files


def container_env(objs, pod_kind, role, c):
    """The variables the pod adds, as the kubelet builds them: the LeaderWorkerSet's, envFrom, then env in
    order, each value expanded against the variables defined before it."""
    env = {}
    if pod_kind == "LeaderWorkerSet":
        env.update(LWS_ENV, LWS_WORKER_INDEX="0" if role == "leader" else "1")
    for src in c.get("envFrom", []):
        assert "configMapRef" in src, f"envFrom {src} cannot be resolved offline"
        cm = next(o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"] == src["configMapRef"]["name"])
        env.update({src.get("prefix", "") + k: v for k, v in cm.get("data", {}).items()})
    for e in c.get("env", []):
        ref = e.get("valueFrom")
        if ref is None:
            env[e["name"]] = k8s_expand(e.get("value", ""), env)
        elif "fieldRef" in ref:
            env[e["name"]] = FIELD_REF.get(ref["fieldRef"]["fieldPath"], "placeholder")
        else:
            env[e["name"]] = "1" if "resourceFieldRef" in ref else "placeholder"
    return env


class ContainerFiles:
    """The container's file system, as far as the server reads it: mounted volumes over the image."""

    def __init__(self, objs, spec, c, image_files):
        cms = {o["metadata"]["name"]: o for o in by_kind(objs, "ConfigMap")}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        self.image_files = image_files
        self.mounts = []  # (mount path, volume kind, {file path in the container: text} for ConfigMaps)
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            files = {}
            if "configMap" in v:
                data = cms[v["configMap"]["name"]]["data"]
                for it in v["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                    if m.get("subPath"):
                        if it["path"] == m["subPath"]:
                            files[m["mountPath"]] = data[it["key"]]
                    else:
                        files[os.path.join(m["mountPath"], it["path"])] = data[it["key"]]
            kind = next(k for k in v if k != "name")
            self.mounts.append((m["mountPath"].rstrip("/"), kind, files))

    def find(self, path):
        """('configMap', text) | (volume kind, None) | ('image', local path) | (None, None)."""
        for mount, kind, files in sorted(self.mounts, key=lambda m: -len(m[0])):
            if path == mount or path.startswith(mount + "/"):
                return kind, files.get(path)
        for dest, local in self.image_files.items():
            if path == dest or path.startswith(dest.rstrip("/") + "/"):
                return "image", local + path[len(dest):]
        return None, None


def flag_value(args, flag):
    """(index of the value, value) of the last `--flag V` or `--flag=V` in args, or (None, None)."""
    found = (None, None)
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            found = (i + 1, args[i + 1])
        elif a.startswith(flag + "="):
            found = (i, a[len(flag) + 1:])
    return found


def set_flag_value(args, i, flag, value):
    args[i] = f"{flag}={value}" if args[i].startswith(flag + "=") else value


def env_name(key):
    return "KRAKEN_" + key.upper().replace("-", "_")


def container_command(objs, pod_kind, role, spec, c, tmp_path):
    """The container's kraken-server command line and KRAKEN_* environment, paths translated to this
    machine, with what they amount to: (argv, env, {'model', 'devices', 'shadowed'})."""
    entrypoint, image_cmd, image_env, image_files = image_runtime(c["image"])
    pod_env = container_env(objs, pod_kind, role, c)
    env = {**image_env, **pod_env}
    # Kubernetes: command replaces ENTRYPOINT (and drops CMD); args replace CMD. $(VAR) expands in both.
    command = c.get("command", entrypoint)
    args = c["args"] if "args" in c else ([] if "command" in c else image_cmd)
    argv = [k8s_expand(a, env) for a in command + args]
    assert argv[0] == IMAGE_BIN, f"the container runs {argv[0]}, not {IMAGE_BIN}"
    argv = argv[1:]
    # What the server reads: its own variables and LeaderWorkerSet's (--nodes, --join, --node-rank).
    env = {k: v for k, v in env.items() if k.startswith(("KRAKEN_", "LWS_"))}
    fs = ContainerFiles(objs, spec, c, image_files)
    # The config file --config (or KRAKEN_CONFIG) names: a mounted ConfigMap's or the image's.
    cfg_i, cfg_path = flag_value(argv, "--config")
    if cfg_path is None:
        cfg_path = env.get("KRAKEN_CONFIG")
    toml_text = None
    if cfg_path is not None:
        where, found = fs.find(cfg_path)
        if where == "image" and os.path.isfile(found):
            with open(found) as f:
                toml_text = f.read()
        else:
            assert where == "configMap" and found is not None, \
                f"--config {cfg_path}: no such file in the container ({where})"
            toml_text = found
    toml = tomllib.loads(toml_text) if toml_text is not None else {}

    # Precedence as the server's: command line, then KRAKEN_*, then the file, then the default.
    def effective(key, default=None):
        _, v = flag_value(argv, "--" + key)
        return v if v is not None else env.get(env_name(key), toml.get(key, default))

    # A file key that a variable or a flag overrides never takes effect; a pod variable that a flag
    # overrides neither (the image's variables are defaults, meant to be overridden).
    shadowed = sorted({f"server.toml key {k!r} (by {env_name(k) if env_name(k) in env else '--' + k})"
                       for k in toml if env_name(k) in env or flag_value(argv, "--" + k)[0] is not None} |
                      {f"env {k} (by --{k[7:].lower().replace('_', '-')})" for k in pod_env
                       if k.startswith("KRAKEN_") and flag_value(argv, "--" + k[7:].lower().replace("_", "-"))[0]
                       is not None})
    devices = str(effective("devices", "cpu:1"))
    # A LeaderWorkerSet group's world spans its pods: the model must split over all of them.
    nodes = int(LWS_ENV["LWS_GROUP_SIZE"]) if pod_kind == "LeaderWorkerSet" else 1
    stand_in = DEFAULT_MODEL if devices.startswith("cpu") else kraken8_model(tmp_path, 8 * nodes)

    def local_model(path):
        where, found = fs.find(str(path))
        if where == "image":
            return found
        if where == "persistentVolumeClaim":
            return stand_in
        return None

    model = effective("model")
    assert model is not None and local_model(model) is not None, \
        f"model {model} is neither in the image nor on a volume (the server's default is relative to /)"
    # Every place that names a model names its local counterpart.
    i, v = flag_value(argv, "--model")
    if i is not None:
        set_flag_value(argv, i, "--model", local_model(v) or v)
    if "KRAKEN_MODEL" in env:
        env["KRAKEN_MODEL"] = local_model(env["KRAKEN_MODEL"]) or env["KRAKEN_MODEL"]
    if toml_text is not None:
        if "model" in toml:
            new = local_model(toml["model"]) or toml["model"]
            toml_text, n = re.subn(r'(?m)^(\s*model\s*=\s*)(".*?"|\'.*?\')',
                                   lambda m: m.group(1) + json.dumps(new), toml_text)
            assert n == 1 and tomllib.loads(toml_text) == {**toml, "model": new}
        local_cfg = tmp_path / f"{role}-server.toml"
        local_cfg.write_text(toml_text)
        if cfg_i is not None:
            set_flag_value(argv, cfg_i, "--config", str(local_cfg))
        else:
            env["KRAKEN_CONFIG"] = str(local_cfg)
    return [SERVER_BIN, *argv], env, {"model": local_model(model), "devices": devices, "shadowed": shadowed}


def run_server(argv, env, cwd):
    # Exactly this environment (plus PATH), outside the checkout so a relative path cannot resolve by
    # accident.
    return subprocess.run(argv, env={"PATH": os.environ["PATH"], **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("overlay,kind,role", POD_CASES)
def test_manifest_command_runs_on_the_real_server(overlay, kind, role, tmp_path):
    objs = render(overlay)
    spec = workload_pods(objs)[(kind, role)]["spec"]
    # No <SERVICE>_PORT=tcp://... variables: for a Service named kraken... they would be KRAKEN_*
    # variables, which the server refuses.
    assert spec.get("enableServiceLinks") is False, f"{overlay} {kind} {role}: set enableServiceLinks: false"
    assert spec["containers"]
    for c in spec["containers"]:
        argv, env, eff = container_command(objs, kind, role, spec, c, tmp_path)
        argv.append("--print-resources")
        what = f"{overlay} {kind} {role} container {c['name']}: {' '.join(argv)}\nwith {env}"
        assert not eff["shadowed"], f"{what}\nsettings that never take effect: {eff['shadowed']}"
        r = run_server(argv, env, tmp_path)
        assert r.returncode == 0, f"{what}\nexit {r.returncode}: {r.stderr}"
        need = json.loads(r.stdout)
        if kind == "LeaderWorkerSet":
            # Every pod of the group counts the whole world; a worker pod joins the leader's cluster port.
            assert need["nodes"] == int(LWS_ENV["LWS_GROUP_SIZE"]), (what, need)
            assert need["world_size"] == need["nodes"] * device_count(need["devices"]), (what, need)
            leader = workload_pods(objs)[(kind, "leader")]["spec"]["containers"][0]
            cluster_port = {p["name"]: p["containerPort"] for p in leader["ports"]}["cluster"]
            if role == "leader":
                assert need["cluster_port"] == cluster_port, (what, need)
            if role == "worker":
                i, join = flag_value(argv, "--join")
                assert join == f'{LWS_ENV["LWS_LEADER_ADDRESS"]}:{cluster_port}', (what, join)
        # What the server would run agrees with the pod: model, devices, GPUs, ports.
        assert need["model"] == eff["model"] and need["devices"] == eff["devices"], (what, need)
        assert need["gpus"] == int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)), (what, need)
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if "grpc" in ports:
            assert (need["grpc_port"], need["metrics_port"]) == (ports["grpc"], ports["metrics"]), (what, need)
        if "http" in ports:
            assert need["http_port"] == ports["http"], (what, need)


@pytest.mark.parametrize("image", ["kraken-serve:cpu", "registry.example.com/kraken-serve:cuda"])
def test_image_default_command_runs_on_the_real_server(image, tmp_path):
    """`docker run IMAGE`: ENTRYPOINT, CMD and ENV only (the image's own config file)."""
    c = {"name": "docker-run", "image": image}
    argv, env, eff = container_command([], "docker", "run", {}, c, tmp_path)
    r = run_server([*argv, "--print-resources"], env, tmp_path)
    assert r.returncode == 0, f"{' '.join(argv)} with {env}\nexit {r.returncode}: {r.stderr}"
    need = json.loads(r.stdout)
    assert need["model"] == DEFAULT_MODEL and need["devices"] == eff["devices"], need
    assert (need["http_port"], need["grpc_port"], need["metrics_port"]) == (8000, 8001, 8002)


def test_cpu_level_node_affinity_example_renders_and_validates(tmp_path):
    """The cpu-dev overlay's commented-out node affinity (Node Feature Discovery labels), uncommented,
    renders into a valid Deployment requiring the x86-64-v3 features the CPU image is built for that NFD
    labels by default (AVX2, FMA3); the overlay as shipped requires none (pods would stay Pending on
    clusters without NFD)."""
    arch = next(a for i, a in dockerfile_stages(os.path.join(DEPLOY, "docker", "Dockerfile.cpu"))[0][1]
                if i == "ARG" and a.startswith("KRAKEN_CPU_ARCH="))
    assert arch == "KRAKEN_CPU_ARCH=x86-64-v3", "the example's features are x86-64-v3's: update it with the arch"
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    kust = k8s / "overlays" / "cpu-dev" / "kustomization.yaml"
    text = kust.read_text()
    m = re.search(r"\n( *)# BEGIN cpu-level-node-affinity\n(.*?)\n *# END cpu-level-node-affinity", text, re.S)
    assert m, "the node affinity example is gone from the cpu-dev overlay"
    indent, block = m.group(1), m.group(2)
    assert all(line.startswith(indent + "# ") for line in block.splitlines())
    kust.write_text(text.replace(block, "\n".join(indent + line[len(indent) + 2:] for line in block.splitlines())))
    dep = by_kind(render(str(k8s / "overlays" / "cpu-dev")), "Deployment")[0]
    kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 1  # terms are ORed: one term, its expressions ANDed
    assert sorted((e["key"], e["operator"], e["values"]) for e in terms[0]["matchExpressions"]) == sorted(
        (f"feature.node.kubernetes.io/cpu-cpuid.{f}", "In", ["true"]) for f in ("AVX2", "FMA3"))
    assert "affinity" not in by_kind(render("cpu-dev"), "Deployment")[0]["spec"]["template"]["spec"]


def test_the_multinode_cluster_port_is_mutual_tls_and_fenced_to_the_group():
    """Both pods of a group find the group's certificate, key and CA in the mounted Secret (so the leader,
    which refuses a plaintext group, starts), and a NetworkPolicy lets only the group's pods reach port 8003."""
    objs = render("dgx-h100-multinode")
    pods = workload_pods(objs)
    for role in ("leader", "worker"):
        spec = pods[("LeaderWorkerSet", role)]["spec"]
        c = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        secret_mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for var, key in (("KRAKEN_CLUSTER_CERT", "tls.crt"), ("KRAKEN_CLUSTER_KEY", "tls.key"),
                         ("KRAKEN_CLUSTER_CA", "ca.crt")):
            path = env.get(var)
            assert path is not None and path.endswith("/" + key), (role, var, path)
            volume = volumes[secret_mounts[os.path.dirname(path)]]
            assert volume["secret"]["secretName"] == "kraken-cluster-tls", (role, volume)
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"], role  # it can read them
    policies = by_kind(objs, "NetworkPolicy")
    leader_labels = pods[("LeaderWorkerSet", "leader")].get("metadata", {}).get("labels", {})
    group = "h100x2-kraken-serve"
    guarding = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("leaderworkerset.sigs.k8s.io/name")
                == group and p["spec"]["podSelector"]["matchLabels"].get("leaderworkerset.sigs.k8s.io/worker-index")
                == "0"]
    assert len(guarding) == 1, policies
    rules = guarding[0]["spec"]["ingress"]
    open_ports = {p["port"] for r in rules if "from" not in r for p in r.get("ports", [])}
    assert 8003 not in open_ports and {8000, 8001, 8002} <= open_ports, rules
    # The port is open to pods that carry the group's name (and whatever labels Kustomize adds, which
    # both pod templates carry too).
    worker_labels = pods[("LeaderWorkerSet", "worker")]["metadata"]["labels"]
    fenced = [r for r in rules if "from" in r]
    assert len(fenced) == 1 and "ports" not in fenced[0], rules
    selector = fenced[0]["from"][0]["podSelector"]["matchLabels"]
    assert selector.get("leaderworkerset.sigs.k8s.io/name") == group, selector
    for labels in (leader_labels, worker_labels):
        assert all(labels.get(k) == v for k, v in selector.items() if not k.startswith("leaderworkerset.")), labels
