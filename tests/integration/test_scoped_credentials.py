"""A job's S3 credentials reach its own checkpoint folder only (STS and S3 of a moto server).

moto evaluates a role's own policies when IAM enforcement is on, but not the session policy of
an AssumeRole call. So the test checks three things: the session policy STS received is exactly
the one generated, moto's own policy evaluator allows the job's folder with it and nothing else,
and a real process started by the Supervisor uses the credentials it was handed (no other: a
bucket the job role may not touch is refused to it under enforcement).
"""

import json
import os
import sys
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from spotwise.worker.agent.scoped_credentials import (
    JobCredentialIssuer,
    ScopedCredentials,
    ScopeError,
    assume_job_role,
    job_scope,
    refresh_due,
    session_policy,
    write_credentials,
)
from spotwise.worker.agent.supervisor import LaunchSpec, Supervisor, log_path
from tests.support.s3 import moto_s3
from tests.support.wait import until

ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::fleet", "arn:aws:s3:::fleet/*"]},
    ],
}
TRUST = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": ["sts:AssumeRole", "sts:TagSession"]}],
}


@pytest.fixture(scope="module")
def aws():
    with moto_s3() as env:
        kw = dict(endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
        s3 = boto3.client("s3", **kw)
        for bucket in ("fleet", "other"):
            s3.create_bucket(Bucket=bucket)
        iam = boto3.client("iam", **kw)
        role = iam.create_role(RoleName="spotwise-job", AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]
        iam.put_role_policy(RoleName="spotwise-job", PolicyName="checkpoints", PolicyDocument=json.dumps(ROLE_POLICY))
        yield env, kw, role["Arn"]


def test_the_scope_is_the_jobs_own_folder():
    scope = job_scope("s3://fleet/ckpt/job-a", job_id="job-a", base_prefix="s3://fleet/ckpt")
    assert (scope.bucket, scope.prefix) == ("fleet", "ckpt/job-a")
    assert job_scope("s3://fleet/ckpt/job-a/run2", job_id="job-a", base_prefix="s3://fleet/ckpt/").prefix == "ckpt/job-a"
    for uri, job in [("s3://fleet/ckpt/job-b", "job-a"), ("s3://fleet/ckpt/job-ab", "job-a"),
                     ("s3://fleet/ckpt", "job-a"), ("s3://other/ckpt/job-a", "job-a"),
                     ("/local/ckpt/job-a", "job-a"), ("s3://fleet/ckpt/job-a", "../x")]:
        with pytest.raises(ScopeError):
            job_scope(uri, job_id=job, base_prefix="s3://fleet/ckpt")


def test_sts_receives_exactly_the_session_policy_and_it_allows_only_the_jobs_folder(aws):
    from moto.iam.access_control import IAMPolicy, PermissionResult
    from moto.sts.models import sts_backends

    env, kw, role_arn = aws
    scope = job_scope("s3://fleet/ckpt/job-a", job_id="job-a", base_prefix="s3://fleet/ckpt")
    creds = assume_job_role(boto3.client("sts", **kw), role_arn=role_arn, scope=scope, job_id="job-a", generation=3)
    assert creds.expiration > datetime.now(UTC) + timedelta(minutes=50)
    recorded = [r for acct in sts_backends.values() for part in acct.values() for r in part.assumed_roles
                if r.access_key_id == creds.access_key_id]
    assert len(recorded) == 1 and recorded[0].session_name == "spotwise-job-a-g3"
    assert json.loads(recorded[0].policy) == session_policy(scope)
    policy = IAMPolicy(recorded[0].policy)
    allowed = PermissionResult.PERMITTED
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert policy.is_action_permitted(action, "arn:aws:s3:::fleet/ckpt/job-a/manifests/step-1.json") == allowed
        for elsewhere in ("arn:aws:s3:::fleet/ckpt/job-b/manifests/step-1.json", "arn:aws:s3:::fleet/ckpt/job-ab/x",
                          "arn:aws:s3:::other/ckpt/job-a/x", "arn:aws:s3:::fleet/ckpt/x"):
            assert policy.is_action_permitted(action, elsewhere) != allowed, (action, elsewhere)
    assert policy.is_action_permitted("s3:DeleteBucket", "arn:aws:s3:::fleet") != allowed
    assert policy.is_action_permitted("iam:CreateUser", "*") != allowed


JOB = (
    "import boto3, sys\n"
    "s3 = boto3.client('s3')\n"
    "s3.put_object(Bucket='fleet', Key='ckpt/job-a/probe', Body=b'ok')\n"
    "print('OWN', s3.get_object(Bucket='fleet', Key='ckpt/job-a/probe')['Body'].read().decode())\n"
    "try:\n"
    "    s3.put_object(Bucket='other', Key='x', Body=b'no')\n"
    "    print('OTHER written')\n"
    "except Exception as e:\n"
    "    print('OTHER', getattr(e, 'response', {}).get('Error', {}).get('Code', type(e).__name__))\n"
    "print('KEY', boto3.Session().get_credentials().access_key)\n"
)


def test_a_job_process_uses_the_scoped_credentials_and_no_other(aws, tmp_path, monkeypatch):
    from moto import settings

    env, kw, role_arn = aws
    scope = job_scope("s3://fleet/ckpt/job-a", job_id="job-a", base_prefix="s3://fleet/ckpt")
    creds = assume_job_role(boto3.client("sts", **kw), role_arn=role_arn, scope=scope, job_id="job-a", generation=1)
    storage_env = write_credentials(tmp_path / "creds", creds)
    assert oct((tmp_path / "creds" / "aws-credentials.json").stat().st_mode & 0o777) == "0o640"
    # The agent's own environment holds the fleet's credentials; the job must not use them.
    agent_env = {**os.environ, **env, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    spec = LaunchSpec(job_id="job-a", generation=1, entrypoint=(sys.executable, "-c", JOB), world_size=1,
                      node_rank=0, num_nodes=1, rank_start=0, nproc=1, master_addr="127.0.0.1", master_port=1)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto enforces IAM from now on
    sup = Supervisor(spec, log_dir=tmp_path / "logs", base_env=agent_env, storage_env=storage_env)
    sup.start()
    try:
        until(lambda: (sup.poll(), not sup.running)[1], 60, "the job process to exit")
    finally:
        sup.stop_blocking(1.0)
    out = log_path(tmp_path / "logs", spec, 0).read_text()
    assert sup.processes[0].exit_code == 0, out
    assert "OWN ok" in out
    assert "OTHER AccessDenied" in out, out
    assert f"KEY {creds.access_key_id}" in out and "testing" not in out.split("KEY", 1)[1]


def test_refresh_is_due_well_before_botocore_would_give_up():
    exp = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    c = ScopedCredentials(access_key_id="a", secret_access_key="b", session_token="c", expiration=exp)
    assert not refresh_due(c, exp - timedelta(minutes=30))
    assert refresh_due(c, exp - timedelta(minutes=20))
    assert json.loads(c.process_output())["Expiration"] == "2026-01-01T12:00:00Z"


def test_the_issuer_writes_renews_and_forgets_a_generations_credentials(aws, tmp_path):
    env, kw, role_arn = aws
    now = [datetime.now(UTC)]
    issuer = JobCredentialIssuer(boto3.client("sts", **kw), role_arn=role_arn, base_prefix="s3://fleet/ckpt/",
                                 clock=lambda: now[0])
    folder = tmp_path / "g1" / "aws"
    storage_env = issuer.issue(job_id="job-a", generation=1, checkpoint_uri="s3://fleet/ckpt/job-a", folder=folder,
                               gid=os.getgid())
    first = json.loads((folder / "aws-credentials.json").read_text())
    assert storage_env["AWS_CONFIG_FILE"] == str(folder / "aws-config")
    assert oct(folder.stat().st_mode & 0o777) == "0o750"
    assert issuer.refresh() == 0  # nothing due yet
    now[0] += timedelta(minutes=45)
    assert issuer.refresh() == 1
    second = json.loads((folder / "aws-credentials.json").read_text())
    assert second["AccessKeyId"] != first["AccessKeyId"]
    issuer.forget("job-a", 1)
    now[0] += timedelta(minutes=45)
    assert issuer.refresh() == 0
    # A job whose checkpoints are not its own folder gets nothing.
    with pytest.raises(ScopeError):
        issuer.issue(job_id="job-b", generation=1, checkpoint_uri="s3://fleet/ckpt/job-a", folder=tmp_path / "b")
    assert not (tmp_path / "b").exists()
