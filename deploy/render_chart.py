"""Renders deploy/chart/whoclosed offline with Helm's own engine (PyPI helm-python-sdk, a
C binding of Helm's Go SDK; no helm binary exists in the registries this project builds
with) and writes the manifests to one file, for kubernetes-validate and deploy/check.py.
Run by `cargo xtask deploy-check`.

usage: render_chart.py CHART OUT [--values JSON] [--compare PLAIN]
  --values   values overriding the chart's values.yaml (checked against values.schema.json)
  --compare  fail unless the rendered objects equal PLAIN's (less its Namespace)
"""
import argparse
import json
import sys

import yaml
from helm_python.chart import Chart


def objects(text):
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("chart")
    ap.add_argument("out")
    ap.add_argument("--values", default="{}")
    ap.add_argument("--compare")
    a = ap.parse_args()
    chart = Chart.load(a.chart)
    values = json.loads(a.values)
    try:
        chart.validate_schema(values)
        rendered = chart.render(values, name="whoclosed", namespace="whoclosed", is_install=True)
    except Exception as e:  # the SDK's errors name the failing value or template
        print(f"render_chart: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    docs = [rendered[k] for k in sorted(rendered) if rendered[k].strip()]
    text = "---\n".join(docs)
    with open(a.out, "w") as f:
        f.write(text)
    if a.compare:
        plain = objects(open(a.compare).read())
        plain.pop(("Namespace", "whoclosed"), None)
        got = objects(text)
        if got != plain:
            for k in sorted(set(got) | set(plain)):
                if got.get(k) != plain.get(k):
                    print(f"render_chart: {k} differs from {a.compare}", file=sys.stderr)
            return 1
    print(f"render_chart: {len(docs)} manifests -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
