"""The daemon with provider = "ec2" against a real moto server (EC2 and Auto Scaling over HTTP
on port 0): a submitted job gets tagged spot instances through the fleet; a node registering
from one of them is charged at EC2's spot price history (the price book, refreshed off the
event loop), with the on-demand reference from the offline table (moto has no Pricing API);
a restarted daemon finds its instances again by tag and launches no more; after `cancel` no
instance of the job stays running.

No agent runs on moto's instances; the test registers one node over gRPC as the agent of one
instance would (its instance id, type and zone, no price of its own).
"""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path

import boto3
import grpc
import pytest

from spotwise.client import Client
from spotwise.cloud.ec2 import TAG_CLUSTER, TAG_JOB, TAG_NODE
from spotwise.cloud.pricing import load_offline_table
from spotwise.config import DaemonConfig
from spotwise.daemon.server import DaemonThread, make_provider
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2
from tests.support.wait import until as _until

AMI = "ami-12c6146b"  # one of moto's built-in images
OFFLINE = load_offline_table()


pytestmark = pytest.mark.usefixtures("aws_test_credentials")


def _live(ec2, **tags: str) -> list[dict]:
    flt = [{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    flt += [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
    return [i for r in ec2.describe_instances(Filters=flt)["Reservations"] for i in r["Instances"]]


def _tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


@pytest.mark.slow
def test_ec2_daemon_launches_tagged_spot_prices_them_survives_a_restart_and_cancels(
        moto_url: str, tmp_path: Path) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_url)
    template = ec2.create_launch_template(
        LaunchTemplateName=f"spotwise-daemon-{uuid.uuid4().hex[:8]}",
        LaunchTemplateData={"ImageId": AMI, "InstanceType": "t3.micro"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    cluster = f"c-daemon-{uuid.uuid4().hex[:8]}"
    config = DaemonConfig(
        listen="127.0.0.1:0", state_dir=tmp_path / "state", heartbeat_interval_s=0.5,
        lease_s=60.0, restart_grace_s=60.0, settle_s=0.1, accounting_interval_s=0.5,
        fleet_interval_s=0.3, grow_checkpoint_timeout_s=0, provider="ec2",
        advertise_address="10.0.0.5:7450",  # what agents on the instances dial
        ec2={"endpoint_url": moto_url, "launch_template": template,
             "zones": ["us-east-1a", "us-east-1b"], "cluster": cluster},
        # moto has no Pricing API: on-demand prices fall back to the offline table
        pricing={"pricing_endpoint_url": moto_url, "timeout_s": 2.0},
    )
    assert not config.pricing_offline

    with DaemonThread(config, provider=make_provider(config)) as daemon, \
            Client(daemon.address, timeout=10) as client:
        job_id = client.submit({
            "entrypoint": ["python", "train.py"], "checkpoint": {"uri": "s3://bucket/ckpt"},
            "global_batch_size": 8, "nodes": {"min": 1, "max": 2},
            "instance_types": ["g4dn.xlarge", "g5.xlarge"], "market": "spot",
        })
        # CreateFleet tags the job; the provider adds the node tag right after
        instances = _until(lambda: len(got := _live(ec2, **{TAG_JOB: job_id})) == 2
                           and all(TAG_NODE in _tags(i) for i in got) and got, 30,
                           "two tagged instances for the job")
        for inst in instances:
            tags = _tags(inst)
            assert tags[TAG_NODE] == inst["InstanceId"] and tags[TAG_CLUSTER] == cluster
            assert inst["InstanceLifecycle"] == "spot"
            assert inst["InstanceType"] in ("g4dn.xlarge", "g5.xlarge")
            assert inst["Placement"]["AvailabilityZone"] in ("us-east-1a", "us-east-1b")
        handles = sorted(i["InstanceId"] for i in instances)
        user_data = ec2.describe_instance_attribute(InstanceId=handles[0], Attribute="userData")
        assert "--daemon 10.0.0.5:7450" in base64.b64decode(user_data["UserData"]["Value"]).decode()

        # The agent of the first instance registers: it knows its identity, not its price.
        inst = instances[0]
        itype, zone = inst["InstanceType"], inst["Placement"]["AvailabilityZone"]

        def spot_price(instance: dict) -> float:
            history = ec2.describe_spot_price_history(
                InstanceTypes=[instance["InstanceType"]], ProductDescriptions=["Linux/UNIX"])
            zone = instance["Placement"]["AvailabilityZone"]
            return float(max((h for h in history["SpotPriceHistory"]
                              if h["AvailabilityZone"] == zone),
                             key=lambda h: h["Timestamp"])["SpotPrice"])
        with grpc.insecure_channel(daemon.address) as channel:
            agents = agent_pb2_grpc.AgentServiceStub(channel)
            registered = agents.Register(agent_pb2.RegisterRequest(
                instance_id=inst["InstanceId"], instance_type=itype, zone=zone, lifecycle="spot",
                address="10.0.0.7", store_port=29500, slots=1), timeout=10)
            node_id = registered.node_id
            # Its first beat: a node is given work once it has beaten.
            agents.Heartbeat(agent_pb2.HeartbeatRequest(
                node_id=node_id, node_secret=registered.node_secret), timeout=10)
        _until(lambda: client.get(job_id).state == jobs_pb2.JOB_STATE_RUNNING, 20, "the job to start")
        assert list(client.get(job_id).node_ids) == [node_id]

        def priced() -> jobs_pb2.CostReport | None:
            report = client.cost(job_id)
            return report if report.price_source.startswith("spot ") else None

        # Both machines run for the job, so both are charged to it: the registered member and
        # the one whose agent has not registered (it boots at the job's expense).
        expected = sum(spot_price(i) for i in instances)
        report = _until(lambda: (r := priced()) and r.rate_usd_per_hour == pytest.approx(
            expected) and r, 30, "spot prices from the price book for both machines")
        assert f"on-demand reference: {OFFLINE.source}" in report.price_source
        # billed at the offline table's spot price until the first refresh, then at EC2's: the
        # on-demand equivalent of the same node-seconds is the table's on-demand price
        assert report.on_demand_equivalent_usd > report.spent_usd > 0
        assert report.savings_usd == pytest.approx(report.on_demand_equivalent_usd - report.spent_usd)

    # A restarted daemon (same state, a new provider object) finds the instances by tag, matches
    # the registered node to its instance by id, and launches nothing more.
    provider = make_provider(config)
    assert sorted(n.handle for n in provider.list_nodes()) == handles
    with DaemonThread(config, provider=provider) as daemon, \
            Client(daemon.address, timeout=10) as client:
        coordinator = daemon.daemon.coordinator
        _until(lambda: daemon.call(lambda: coordinator.nodes[node_id].launched_for) == job_id, 20,
               "the restarted fleet to reconcile")
        assert sorted(i["InstanceId"] for i in _live(ec2, **{TAG_JOB: job_id})) == handles

        job = client.cancel(job_id)
        assert job.state == jobs_pb2.JOB_STATE_CANCELLED
        _until(lambda: not _live(ec2, **{TAG_JOB: job_id}), 30, "the job's instances to go")
        assert not _live(ec2, **{TAG_CLUSTER: cluster})
        # Charged until DescribeInstances no longer shows them running, then no further.
        _until(lambda: daemon.call(lambda: list(coordinator.billing.teardowns)), 20,
               "the daemon to see the machines gone")
        final = client.cost(job_id).spent_usd
        assert final > job.cost_usd
        time.sleep(3 * config.accounting_interval_s)  # accounting ticks pass: nothing more
        assert client.cost(job_id).spent_usd == final
