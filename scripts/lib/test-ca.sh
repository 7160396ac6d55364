# Sourced by the broker scripts (scripts/brokers/*.sh): a throwaway test CA and one server
# certificate for localhost / 127.0.0.1, made once with openssl into $TLS_DIR:
#   ca_certificate.pem      the CA the TLS tests trust
#   server_certificate.pem  the brokers' certificate (RabbitMQ's amqps, Kafka's SSL listeners)
#   server_key.pem          its key (PKCS#8, unencrypted: a test key)
# The CA key is thrown away: when a file goes, a new CA is made.
# ensure_test_ca: makes the files unless they are there. Needs openssl.
ensure_test_ca() {
  if [ -s "$TLS_DIR/server_certificate.pem" ] && [ -s "$TLS_DIR/ca_certificate.pem" ] &&
    [ -s "$TLS_DIR/server_key.pem" ]; then
    return 0
  fi
  command -v openssl >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq openssl >/dev/null
  }
  printf 'tls: making a test CA and a certificate for localhost / 127.0.0.1 in %s\n' "$TLS_DIR"
  mkdir -p "$TLS_DIR"
  local tmp
  tmp=$(mktemp -d)
  cat >"$tmp/ca.cnf" <<'CNF'
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
CN = chanlayer test CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF
  cat >"$tmp/server.cnf" <<'CNF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -config "$tmp/ca.cnf" \
    -keyout "$tmp/ca_key.pem" -out "$TLS_DIR/ca_certificate.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLS_DIR/server_key.pem" -out "$tmp/server.csr" 2>/dev/null
  openssl x509 -req -in "$tmp/server.csr" -days 3650 -CA "$TLS_DIR/ca_certificate.pem" \
    -CAkey "$tmp/ca_key.pem" -CAcreateserial -extfile "$tmp/server.cnf" \
    -out "$TLS_DIR/server_certificate.pem" 2>/dev/null
  rm -rf "$tmp"
  # Throwaway test files; the brokers run as other users (rabbitmq) and must read them.
  chmod 0755 "$TLS_DIR"
  chmod 0644 "$TLS_DIR"/*.pem
}
