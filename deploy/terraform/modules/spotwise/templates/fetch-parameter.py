#!/opt/spotwise/.venv/bin/python
"""Copy one SSM SecureString parameter into a file readable by root and the spotwise group.

    fetch-parameter NAME REGION PATH

Installed by cloud-init (deploy/terraform/modules/spotwise). Retries, bounded, while the
instance profile's credentials or the parameter are not visible yet (IAM is eventually
consistent right after `terraform apply`).
"""

import grp
import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ATTEMPTS = 12
MAX_BACKOFF_S = 30.0


def fetch(name: str, region: str) -> str:
    client = boto3.client(
        "ssm",
        region_name=region,
        config=Config(connect_timeout=10, read_timeout=10, retries={"mode": "standard"}),
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        except (ClientError, BotoCoreError) as e:
            if attempt == ATTEMPTS:
                raise
            delay = min(MAX_BACKOFF_S, 2.0**attempt)
            print(
                f"fetch-parameter: {name}: {e}; retry {attempt}/{ATTEMPTS} in {delay:.0f} s",
                file=sys.stderr,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def main() -> int:
    name, region, path = sys.argv[1:4]
    value = fetch(name, region)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(value if value.endswith("\n") else value + "\n")
    os.chown(tmp, 0, grp.getgrnam("spotwise").gr_gid)
    os.replace(tmp, path)
    print(f"fetch-parameter: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
