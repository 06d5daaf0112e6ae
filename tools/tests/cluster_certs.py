"""Certificates for a multi-node group's mutual TLS, made once per test session with the openssl CLI:
the group's CA, one node certificate it signed (for 127.0.0.1, server and client use: every node,
the leader included, presents it), and a stranger's CA and certificate, which the group must refuse."""
import os
import subprocess
import tempfile

_DIR = os.path.join(tempfile.gettempdir(), f"kraken-cluster-certs-{os.getpid()}")


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=_DIR)


def _sign(name, ca):
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN=kraken-{name}")
    with open(os.path.join(_DIR, f"{name}.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


def certs_dir():
    if not os.path.exists(os.path.join(_DIR, "stranger.pem")):
        os.makedirs(_DIR, exist_ok=True)
        for ca in ("ca", "stranger-ca"):
            _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                     f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=kraken-{ca}")
        _sign("node", "ca")
        _sign("stranger", "stranger-ca")
    return _DIR


def tls_args(who="node"):
    """The cluster flags of a group member ("node") or of a stranger with its own CA ("stranger")."""
    d = certs_dir()
    ca = "ca" if who == "node" else "stranger-ca"
    return ["--cluster-cert", f"{d}/{who}.pem", "--cluster-key", f"{d}/{who}.key", "--cluster-ca", f"{d}/{ca}.pem"]
