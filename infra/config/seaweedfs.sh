#!/bin/sh
# SeaweedFS as `make stack` starts it (infra/servers.py seaweedfs_command): master, volume, filer
# and the S3 gateway in one `weed server`, gRPC ports = HTTP ports + 10000, the Iceberg and Lance
# catalogues off, and S3 open to one identity only, whose keys come from the environment.
# Only S3 binds 0.0.0.0 (the private network); master, volume and filer take no S3 key and bind
# the container's loopback, where the S3 gateway (the same process) reaches them. Compose
# publishes the S3 port on 127.0.0.1 only, Kubernetes gives it a ClusterIP Service and a
# NetworkPolicy. The JWT signing keys (WEED_JWT_*, read by weed in place of security.toml) make
# the filer and the volume server refuse a write, and the filer a read, that S3 or the master did
# not sign; without them this refuses to start.
set -eu
umask 077
: "${WEED_JWT_SIGNING_KEY:?}" "${WEED_JWT_FILER_SIGNING_KEY:?}" "${WEED_JWT_FILER_SIGNING_READ_KEY:?}"
cat > /tmp/s3.json <<JSON
{"identities": [{"name": "trainpipe", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
  "credentials": [{"accessKey": "${AWS_ACCESS_KEY_ID:?}", "secretKey": "${AWS_SECRET_ACCESS_KEY:?}"}]}]}
JSON
# Volumes of 1 GB and as many as the disk holds (make stack's are 256 MB x 50: a test machine's).
exec weed server -dir=/data -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.ip.bind=0.0.0.0 \
  -master.port=19333 -master.port.grpc=29333 \
  -volume.port=18080 -volume.port.grpc=28080 \
  -filer -filer.port=18888 -filer.port.grpc=28888 \
  -s3 -s3.port=18333 -s3.port.grpc=28333 -s3.config=/tmp/s3.json -s3.port.iceberg=0 -s3.port.lance=0 \
  -master.volumeSizeLimitMB=1024 -volume.max=0 -metricsPort=0
