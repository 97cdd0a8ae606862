#!/bin/sh
# Secrets of the equislide stack, made once per cluster (nothing here is committed):
#   FOLDER/dask-ca.pem, dask-ca.key   a private CA for the Dask cluster (keep dask-ca.key offline)
#   FOLDER/dask.pem, dask.key          the certificate every scheduler, worker and client shows
#   ENV_FILE                           PREFECT_API_AUTH_STRING and POSTGRES_PASSWORD (random)
# Usage: deploy/make-secrets.sh [FOLDER (default deploy/secrets)] [ENV_FILE (default deploy/.env)]
#   DAYS=365  validity of the certificates
#   NAMES="DNS:dask-scheduler,DNS:equislide-scheduler,DNS:localhost,IP:127.0.0.1"  subjectAltNames
# Dask checks that the peer's certificate comes from the CA, not its host name, so one certificate
# serves every role.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/secrets}
env_file=${2:-$here/.env}
days=${DAYS:-365}
names=${NAMES:-DNS:dask-scheduler,DNS:equislide-scheduler,DNS:localhost,IP:127.0.0.1}
umask 077
mkdir -p "$dir"
if [ -e "$dir/dask.pem" ]; then
    echo "make-secrets.sh: $dir/dask.pem exists; remove $dir to make new certificates" >&2
    exit 1
fi
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -subj "/CN=equislide Dask CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/dask-ca.key" -out "$dir/dask-ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=equislide-dask" \
    -keyout "$dir/dask.key" -out "$dir/dask.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' "$names" \
    > "$dir/dask.ext"
openssl x509 -req -in "$dir/dask.csr" -CA "$dir/dask-ca.pem" -CAkey "$dir/dask-ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$dir/dask.ext" -out "$dir/dask.pem" 2>/dev/null
rm -f "$dir/dask.csr" "$dir/dask.ext" "$dir/dask-ca.srl"
chmod 644 "$dir/dask-ca.pem" "$dir/dask.pem"
if [ ! -e "$env_file" ]; then
    {
        echo "PREFECT_API_AUTH_STRING=equislide:$(openssl rand -hex 24)"
        echo "POSTGRES_PASSWORD=$(openssl rand -hex 24)"
    } > "$env_file"
fi
echo "wrote $dir/dask-ca.pem, $dir/dask.pem, $dir/dask.key and $env_file"
