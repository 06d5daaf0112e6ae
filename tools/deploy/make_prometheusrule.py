#!/usr/bin/env python3
"""Writes deploy/k8s/base/prometheusrule.yaml (a Prometheus Operator PrometheusRule) from
deploy/prometheus/kraken-rules.yml, so the rules Prometheus loads directly and the ones the
Operator loads are the same. --check exits 1 when the file is out of date (CI runs it).

    .venv/bin/python tools/deploy/make_prometheusrule.py [--check]
"""
import argparse
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "deploy", "prometheus", "kraken-rules.yml")
OUT = os.path.join(ROOT, "deploy", "k8s", "base", "prometheusrule.yaml")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, annotations) as literal blocks, as in the source file."""


def _str(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    with open(RULES) as f:
        rules = yaml.safe_load(f)
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "kraken-serve"},
        "spec": {"groups": rules["groups"]},
    }
    head = ("# Generated from deploy/prometheus/kraken-rules.yml by tools/deploy/make_prometheusrule.py;\n"
            "# edit the rules there and re-run it.\n")
    return head + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    text = render()
    if a.check:
        with open(OUT) as f:
            if f.read() != text:
                print(f"{OUT} is out of date: run tools/deploy/make_prometheusrule.py", file=sys.stderr)
                sys.exit(1)
        return
    with open(OUT, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
