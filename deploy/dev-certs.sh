#!/usr/bin/env bash
# A local CA, one server certificate for both services and one client certificate (for mutual TLS), plus two
# random bearer tokens: what TLS + authentication need on one machine or in compose (docs/operations.md, "TLS and
# authentication"). Local development only: production certificates come from your CA or cert-manager.
#
#   bash deploy/dev-certs.sh                  # into .data/certs (git-ignored); does nothing when ca.pem exists
#   bash deploy/dev-certs.sh /path/to/dir     # elsewhere
#   FORCE=1 bash deploy/dev-certs.sh          # new CA, certificates and tokens
#   EXTRA_SANS="DNS:seg.example.com,IP:203.0.113.7" bash deploy/dev-certs.sh   # more names on the server certificate
#
# Files: ca.pem (what clients trust: -cacert, SEGMENTER_TLS_CA; and TLS_CLIENT_CA for mutual TLS), server.pem +
# server.key (TLS_CERT, TLS_KEY), client.pem + client.key (SEGMENTER_TLS_CERT/KEY, grpcurl -cert/-key),
# orchestrator.pem + orchestrator.key (server and client at once: Kubernetes' orchestrator-tls Secret),
# orchestrator.tokens (the orchestrator's AUTH_TOKENS_FILE: what the upstream API sends), segmenter.tokens (the
# segmenter's AUTH_TOKENS_FILE; its one line is the orchestrator's SEGMENTER_TOKEN). The server certificate names
# localhost, 127.0.0.1, ::1, segmenter, orchestrator and their in-cluster names.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.data/certs}
DAYS=${DAYS:-825}
if [[ -f "$DIR/ca.pem" && "${FORCE:-0}" != 1 ]]; then
  echo "dev-certs: $DIR/ca.pem exists; nothing to do (FORCE=1 to make new ones)"
  exit 0
fi
command -v openssl >/dev/null || { echo "dev-certs: openssl is needed" >&2; exit 1; }
mkdir -p "$DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:segmenter,DNS:orchestrator"
sans+=",DNS:segmenter.palette.svc.cluster.local,DNS:orchestrator.palette.svc.cluster.local"
[[ -n "${EXTRA_SANS:-}" ]] && sans+=",$EXTRA_SANS"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$DAYS" \
  -subj "/CN=palette local CA" -keyout "$DIR/ca.key" -out "$DIR/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() { # name subject extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$2" \
    -keyout "$DIR/$1.key" -out "$tmp/$1.csr" 2>/dev/null
  printf '%s\n' "$3" >"$tmp/$1.ext"
  openssl x509 -req -in "$tmp/$1.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial \
    -days "$DAYS" -extfile "$tmp/$1.ext" -out "$DIR/$1.pem" 2>/dev/null
}
issue server "/CN=palette server" "subjectAltName=$sans
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"
issue client "/CN=palette client" "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
# Kubernetes' orchestrator-tls: the orchestrator serves with it and presents it to the segmenter (mutual TLS).
issue orchestrator "/CN=palette orchestrator" "subjectAltName=$sans
extendedKeyUsage=serverAuth,clientAuth
keyUsage=critical,digitalSignature"
rm -f "$DIR/ca.srl"

openssl rand -hex 32 >"$DIR/orchestrator.tokens"
openssl rand -hex 32 >"$DIR/segmenter.tokens"
# The containers run as uid 10001, not the owner of these files: readable by all, which is fine for local keys only.
chmod 0644 "$DIR"/*.key "$DIR"/*.tokens
chmod 0600 "$DIR/ca.key"
echo "dev-certs: CA, server and client certificates and tokens in $DIR"
openssl x509 -in "$DIR/server.pem" -noout -ext subjectAltName | tail -n 1
