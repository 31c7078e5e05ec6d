"""Creates the buckets named on the command line that S3 does not have yet, as `make stack` does
(infra/servers.py create_buckets); a one-shot job that waits up to two minutes for S3 to answer.
boto3 reads the endpoint and keys from the environment (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...).

    python create-buckets.py trainpipe-mlflow trainpipe-dvc
"""

import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError

s3 = boto3.client("s3")
for _ in range(60):
    try:
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        break
    except (BotoCoreError, ClientError):
        time.sleep(2)
else:
    sys.exit("S3 did not answer within 120 s")
for bucket in sys.argv[1:]:
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)
print("buckets:", ", ".join(sys.argv[1:]))
