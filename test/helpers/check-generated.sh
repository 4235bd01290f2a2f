#!/usr/bin/env bash
# Fails when generated/ is not what `npm run generate` makes from proto/ now.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
npx --no-install buf generate --output "$tmp"
npx --no-install buf build -o "$tmp/generated/billing.binpb"
if ! diff -r "$tmp/generated" generated >"$tmp/diff.txt"; then
  echo "generated/ is stale relative to proto/: run 'npm run generate' and commit the result." >&2
  head -40 "$tmp/diff.txt" >&2
  exit 1
fi
echo "generated/ is fresh"
