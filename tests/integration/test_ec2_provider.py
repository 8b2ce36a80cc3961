"""The EC2 provider against a real moto server (EC2 and Auto Scaling over HTTP on port 0)."""

from __future__ import annotations

import base64
import socket

import boto3
import pytest

from spotwise.cloud.ec2 import (
    TAG_CLUSTER,
    TAG_JOB,
    TAG_NODE,
    Ec2Config,
    Ec2Provider,
    agent_user_data,
    fleet_request,
)
from spotwise.cloud.provider import NodeRequest, ProviderError

AMI = "ami-12c6146b"  # one of moto's built-in images
DAEMON = "10.0.0.5:7450"


pytestmark = pytest.mark.usefixtures("aws_test_credentials")


@pytest.fixture
def ec2(moto_url: str):
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_url)


@pytest.fixture
def template(ec2, request: pytest.FixtureRequest) -> str:
    name = f"spotwise-{request.node.name[:80]}".replace("[", "-").replace("]", "")
    return ec2.create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData={"ImageId": AMI, "InstanceType": "t3.micro"},
    )["LaunchTemplate"]["LaunchTemplateId"]


def running(ec2, **filters: str) -> list[dict]:
    flt = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    flt += [{"Name": f"tag:{k}", "Values": [v]} for k, v in filters.items()]
    return [i for r in ec2.describe_instances(Filters=flt)["Reservations"] for i in r["Instances"]]


def tags_of(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def test_spot_fleet_is_tagged_spread_and_found_again_after_restart(moto_url, ec2, template) -> None:
    config = Ec2Config(endpoint_url=moto_url, launch_template=template, zones=("us-east-1a", "us-east-1b"),
                       cluster="c-spot")
    provider = Ec2Provider(config)
    request = NodeRequest(job_id="job-1", instance_types=("g4dn.xlarge", "g5.xlarge"), market="spot",
                          daemon_address=DAEMON)
    nodes = provider.launch(request, 3)
    assert len(nodes) == 3
    assert {n.lifecycle for n in nodes} == {"spot"}
    assert {n.instance_type for n in nodes} <= {"g4dn.xlarge", "g5.xlarge"}
    assert all(n.zone in ("us-east-1a", "us-east-1b") and n.state == "running" for n in nodes)
    for n in nodes:
        assert n.tags[TAG_JOB] == "job-1" and n.tags[TAG_NODE] == n.handle and n.tags[TAG_CLUSTER] == "c-spot"
    # the agent's user data points at the daemon
    user_data = ec2.describe_instance_attribute(InstanceId=nodes[0].handle, Attribute="userData")["UserData"]
    script = base64.b64decode(user_data["Value"]).decode()
    assert script.startswith("#!/bin/bash") and f"spotwise agent --daemon {DAEMON}" in script
    # a new provider (a restarted daemon) finds the same instances by tag
    again = Ec2Provider(config).list_nodes()
    assert sorted(n.handle for n in again) == sorted(n.handle for n in nodes)
    assert {n.job_id for n in again} == {"job-1"}
    # the template version is made once per daemon address
    nodes += provider.launch(request, 1)
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=template)["LaunchTemplateVersions"]
    assert len(versions) == 2
    provider.terminate_job("job-1")
    assert running(ec2, **{TAG_CLUSTER: "c-spot"}) == []


def test_scale_down_terminates_only_what_is_asked_and_ignores_strangers(moto_url, ec2, template) -> None:
    provider = Ec2Provider(Ec2Config(endpoint_url=moto_url, launch_template=template, cluster="c-down"))
    nodes = provider.launch(NodeRequest(job_id="job-2", market="spot", daemon_address=DAEMON), 3)
    stranger = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    provider.terminate([nodes[0].handle, stranger, "i-0000000000000dead"])
    left = sorted(n.handle for n in provider.list_nodes())
    assert left == sorted(n.handle for n in nodes[1:])
    assert [i["InstanceId"] for i in ec2.describe_instances(InstanceIds=[stranger])["Reservations"][0]["Instances"]
            if i["State"]["Name"] == "running"] == [stranger]
    provider.terminate([])  # no call, no error
    ec2.terminate_instances(InstanceIds=[stranger])
    provider.terminate_job("job-2")
    assert provider.wait_terminated([n.handle for n in nodes], timeout_s=10)


def test_cancel_of_one_job_leaves_no_instance_running_and_spares_the_other(moto_url, ec2, template) -> None:
    provider = Ec2Provider(Ec2Config(endpoint_url=moto_url, launch_template=template, cluster="c-cancel"))
    a = provider.launch(NodeRequest(job_id="job-a", market="spot", daemon_address=DAEMON), 2)
    b = provider.launch(NodeRequest(job_id="job-b", market="on-demand", daemon_address=DAEMON), 2)
    assert {n.lifecycle for n in b} == {"on-demand"}
    gone = provider.terminate_job("job-a")
    assert sorted(gone) == sorted(n.handle for n in a)
    assert running(ec2, **{TAG_JOB: "job-a"}) == []
    assert sorted(i["InstanceId"] for i in running(ec2, **{TAG_JOB: "job-b"})) == sorted(n.handle for n in b)
    provider.terminate_job("job-b")
    assert running(ec2, **{TAG_CLUSTER: "c-cancel"}) == []
    assert provider.list_nodes() == []


def test_spot_with_fallback_gets_spot_when_spot_is_there(moto_url, ec2, template) -> None:
    provider = Ec2Provider(Ec2Config(endpoint_url=moto_url, launch_template=template, cluster="c-fb"))
    nodes = provider.launch(NodeRequest(job_id="job-f", market="spot-with-fallback", daemon_address=DAEMON), 2)
    assert [n.lifecycle for n in nodes] == ["spot", "spot"]
    provider.terminate_job("job-f")
    assert running(ec2, **{TAG_CLUSTER: "c-fb"}) == []


def test_auto_scaling_group_mode(moto_url, ec2, template) -> None:
    asg = boto3.client("autoscaling", region_name="us-east-1", endpoint_url=moto_url)
    subnet = ec2.describe_subnets(Filters=[{"Name": "availability-zone", "Values": ["us-east-1a"]}])["Subnets"][0]
    asg.create_auto_scaling_group(
        AutoScalingGroupName="spotwise-workers", MinSize=0, MaxSize=3, DesiredCapacity=0,
        LaunchTemplate={"LaunchTemplateId": template, "Version": "$Latest"}, VPCZoneIdentifier=subnet["SubnetId"])
    provider = Ec2Provider(Ec2Config(endpoint_url=moto_url, auto_scaling_group="spotwise-workers", cluster="c-asg"))
    nodes = provider.launch(NodeRequest(job_id="job-g", market="spot"), 2)
    assert len(nodes) == 2 and all(n.tags[TAG_JOB] == "job-g" for n in nodes)

    def desired() -> int:
        return asg.describe_auto_scaling_groups(AutoScalingGroupNames=["spotwise-workers"])[
            "AutoScalingGroups"][0]["DesiredCapacity"]

    assert desired() == 2
    provider.launch(NodeRequest(job_id="job-g", market="spot"), 5)  # capped at MaxSize 3
    assert desired() == 3
    with pytest.raises(ProviderError, match="MaxSize"):
        provider.launch(NodeRequest(job_id="job-g", market="spot"), 1)
    provider.terminate([nodes[0].handle])
    assert desired() == 2
    assert len(Ec2Provider(Ec2Config(endpoint_url=moto_url, auto_scaling_group="spotwise-workers",
                                     cluster="c-asg")).list_nodes()) == 2
    provider.terminate_job("job-g")
    assert desired() == 0
    assert running(ec2, **{TAG_CLUSTER: "c-asg"}) == []


def test_failures_are_provider_errors_naming_call_and_attempt(moto_url) -> None:
    missing = Ec2Provider(Ec2Config(endpoint_url=moto_url, launch_template="no-such-template", cluster="c-err"))
    with pytest.raises(ProviderError, match="DescribeLaunchTemplateVersions.*no-such-template"):
        missing.launch(NodeRequest(job_id="j", daemon_address=DAEMON), 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = Ec2Provider(Ec2Config(endpoint_url=dead, launch_template="lt-0123", timeout_s=1, max_attempts=1))
    with pytest.raises(ProviderError, match="DescribeInstances"):
        down.list_nodes()
    with pytest.raises(ValueError):
        missing.launch(NodeRequest(job_id="j", daemon_address=DAEMON, market="reserved"), 1)
    with pytest.raises(ValueError):
        missing.launch(NodeRequest(job_id="j", daemon_address=""), 1)


# ---- pure pieces -------------------------------------------------------------------------

def test_fleet_request_shape() -> None:
    args = fleet_request(launch_template_id="lt-1", version="3", instance_types=["g4dn.xlarge", "g5.xlarge"],
                         subnets=["subnet-a", "subnet-b"], zones=["us-east-1c"], count=4, lifecycle="spot",
                         job_id="j", cluster="c")
    overrides = args["LaunchTemplateConfigs"][0]["Overrides"]
    assert [(o["InstanceType"], o["SubnetId"], o["Priority"]) for o in overrides] == [
        ("g4dn.xlarge", "subnet-a", 0.0), ("g4dn.xlarge", "subnet-b", 0.0),
        ("g5.xlarge", "subnet-a", 1.0), ("g5.xlarge", "subnet-b", 1.0)]
    assert args["Type"] == "instant"
    assert args["TargetCapacitySpecification"] == {
        "TotalTargetCapacity": 4, "DefaultTargetCapacityType": "spot", "SpotTargetCapacity": 4}
    od = fleet_request(launch_template_id="lt-1", version="3", instance_types=["p3.2xlarge"], subnets=[],
                       zones=["us-east-1c"], count=1, lifecycle="on-demand", job_id="j", cluster="c")
    assert od["LaunchTemplateConfigs"][0]["Overrides"] == [
        {"InstanceType": "p3.2xlarge", "Priority": 0.0, "AvailabilityZone": "us-east-1c"}]
    assert od["TargetCapacitySpecification"]["OnDemandTargetCapacity"] == 1 and "SpotOptions" not in od
    with pytest.raises(ValueError):
        fleet_request(launch_template_id="lt-1", version="1", instance_types=[], subnets=[], zones=[], count=1,
                      lifecycle="spot", job_id="j", cluster="c")


def test_user_data_and_config_validation() -> None:
    script = agent_user_data("head.internal:7450")
    assert "spotwise agent --daemon head.internal:7450" in script and "systemd-run" in script
    for bad in ("", "nohost", "host:port", ":7450"):
        with pytest.raises(ValueError):
            agent_user_data(bad)
    with pytest.raises(ValueError):
        Ec2Config()
