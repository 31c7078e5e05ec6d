#!/bin/sh
# SeaweedFS as `make stack` starts it (infra/servers.py seaweedfs_command): master, volume, filer
# and the S3 gateway in one `weed server`, gRPC ports = HTTP ports + 10000, the Iceberg and Lance
# catalogues off, and S3 open to the identities of infra/stack.toml [s3.identities] only, each
# with its own keys from the environment and the least it needs: admin (the bucket job), mlflow
# (the MLflow server: its bucket), dvc (training: the DVC bucket), serve (reads MLflow's bucket).
# Only S3 binds 0.0.0.0 (the private network); master, volume and filer take no S3 key and bind
# the container's loopback, where the S3 gateway (the same process) reaches them. Compose
# publishes the S3 port on 127.0.0.1 only, Kubernetes gives it a ClusterIP Service and a
# NetworkPolicy. The JWT signing keys (WEED_JWT_*, read by weed in place of security.toml) make
# the filer and the volume server refuse a write, and the filer a read, that S3 or the master did
# not sign; /etc/trainpipe/security.toml (infra/config/seaweedfs-security.toml) makes every gRPC
# port take mutual TLS only, with the certificates of /etc/trainpipe/tls (python -m infra.envfile
# writes them to infra/seaweedfs-tls/). Without any of these this refuses to start.
set -eu
umask 077
: "${WEED_JWT_SIGNING_KEY:?}" "${WEED_JWT_FILER_SIGNING_KEY:?}" "${WEED_JWT_FILER_SIGNING_READ_KEY:?}"
for file in /etc/trainpipe/security.toml /etc/trainpipe/tls/ca.crt /etc/trainpipe/tls/seaweedfs.crt \
  /etc/trainpipe/tls/seaweedfs.key; do
  [ -r "$file" ] || { echo "seaweedfs.sh: cannot read $file; gRPC would take anyone" >&2; exit 1; }
done
cat > /tmp/s3.json <<JSON
{"identities": [
  {"name": "admin", "actions": ["Admin"],
   "credentials": [{"accessKey": "${S3_ADMIN_ACCESS_KEY:?}", "secretKey": "${S3_ADMIN_SECRET_KEY:?}"}]},
  {"name": "mlflow", "actions": ["Read:trainpipe-mlflow", "Write:trainpipe-mlflow", "List:trainpipe-mlflow"],
   "credentials": [{"accessKey": "${S3_MLFLOW_ACCESS_KEY:?}", "secretKey": "${S3_MLFLOW_SECRET_KEY:?}"}]},
  {"name": "dvc", "actions": ["Read:trainpipe-dvc", "Write:trainpipe-dvc", "List:trainpipe-dvc"],
   "credentials": [{"accessKey": "${S3_DVC_ACCESS_KEY:?}", "secretKey": "${S3_DVC_SECRET_KEY:?}"}]},
  {"name": "serve", "actions": ["Read:trainpipe-mlflow", "List:trainpipe-mlflow"],
   "credentials": [{"accessKey": "${S3_SERVE_ACCESS_KEY:?}", "secretKey": "${S3_SERVE_SECRET_KEY:?}"}]}
]}
JSON
# Volumes of 1 GB and as many as the disk holds (make stack's are 256 MB x 50: a test machine's).
exec weed -config_dir=/etc/trainpipe server -dir=/data -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.ip.bind=0.0.0.0 \
  -master.port=19333 -master.port.grpc=29333 \
  -volume.port=18080 -volume.port.grpc=28080 \
  -filer -filer.port=18888 -filer.port.grpc=28888 \
  -s3 -s3.port=18333 -s3.port.grpc=28333 -s3.config=/tmp/s3.json -s3.port.iceberg=0 -s3.port.lance=0 \
  -master.volumeSizeLimitMB=1024 -volume.max=0 -metricsPort=0
