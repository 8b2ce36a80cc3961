"""The EC2 provider: spot (or on-demand) machines that run a spotwise node agent.

Two ways to get machines:

- **CreateFleet** (type ``instant``, the default): one synchronous call with launch-template
  overrides across the allowed instance types and subnets/zones. The launch template (made by
  the Terraform module or by hand) holds the AMI, the instance profile and the network; this
  provider adds a template version whose user data starts ``spotwise agent --daemon ADDR``.
  Markets: "spot", "on-demand", or "spot-with-fallback" (spot first, the shortfall on demand).
- **An existing auto scaling group** (``auto_scaling_group`` set): the provider raises or
  lowers its desired capacity; the group's launch template supplies the user data. The group
  launches asynchronously, so instances that appear later are claimed (tagged) for the jobs
  still owed nodes at the next `list_nodes`.

Every instance carries the tags ``spotwise:job``, ``spotwise:node`` (the instance id, which the
agent reports as its provider node) and ``spotwise:cluster``; after a daemon restart
`list_nodes` finds them again by those tags. boto3 is imported lazily. A failed AWS call raises
ProviderError naming the call and what was tried.
"""

from __future__ import annotations

import base64
import logging
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spotwise.cloud.aws import AwsConfig, aws_call_errors, aws_client, error_code
from spotwise.cloud.provider import NodeRequest, Provider, ProviderError, ProviderNode
from spotwise.common.address import check_host_port

log = logging.getLogger(__name__)

TAG_JOB = "spotwise:job"
TAG_NODE = "spotwise:node"
TAG_CLUSTER = "spotwise:cluster"
MARKETS = ("spot", "on-demand", "spot-with-fallback")
LIVE_STATES = ("pending", "running")


@dataclass(frozen=True, kw_only=True)
class Ec2Config:
    """Where and how the EC2 provider launches machines."""

    region: str = "us-east-1"
    """AWS region."""
    endpoint_url: str | None = None
    """EC2 and Auto Scaling endpoint override (a moto server in tests)."""
    launch_template: str = ""
    """Launch template id ("lt-...") or name; required for CreateFleet."""
    launch_template_version: str = "$Default"
    """Version of it to base the agent's user data on."""
    subnets: tuple[str, ...] = ()
    """Subnet ids to spread over (one override per type and subnet); empty: `zones` or any."""
    zones: tuple[str, ...] = ()
    """Availability zones to spread over when no subnets are given; empty: EC2 chooses."""
    instance_types: tuple[str, ...] = ("g4dn.xlarge",)
    """Instance types when a request names none."""
    auto_scaling_group: str = ""
    """Name of an existing auto scaling group to scale instead of CreateFleet."""
    cluster: str = "default"
    """Value of the spotwise:cluster tag, so two daemons in one account keep apart."""
    agent_command: str = "spotwise agent"
    """Command that starts the agent on the machine (the AMI must have spotwise installed)."""
    spot_allocation_strategy: str = "price-capacity-optimized"
    """CreateFleet SpotOptions.AllocationStrategy."""
    timeout_s: float = 30.0
    """HTTP timeout of each AWS call."""
    max_attempts: int = 3
    """Attempts per AWS call (botocore standard retries with backoff)."""

    def __post_init__(self) -> None:
        if not self.auto_scaling_group and not self.launch_template:
            raise ValueError("ec2 provider needs launch_template (CreateFleet) or auto_scaling_group")
        if not self.cluster:
            raise ValueError("ec2 provider cluster tag must not be empty")


def agent_user_data(daemon_address: str, agent_command: str = "spotwise agent") -> str:
    """The cloud-init shell script that starts the agent at first boot, pointed at the daemon.

    It runs the agent as a transient systemd service (restarted on failure) where systemd is
    there, else in the background with a log file.
    """
    check_host_port(daemon_address, "daemon address")
    command = f"{agent_command} --daemon {shlex.quote(daemon_address)}"
    return "\n".join([
        "#!/bin/bash",
        "# spotwise node agent, written by spotwise.cloud.ec2",
        "set -euo pipefail",
        "if command -v systemd-run >/dev/null 2>&1; then",
        f"  systemd-run --unit=spotwise-agent --property=Restart=on-failure {command}",
        "else",
        f"  nohup {command} >>/var/log/spotwise-agent.log 2>&1 &",
        "fi",
        "",
    ])


def fleet_request(
    *,
    launch_template_id: str,
    version: str,
    instance_types: Sequence[str],
    subnets: Sequence[str],
    zones: Sequence[str],
    count: int,
    lifecycle: str,
    job_id: str,
    cluster: str,
    spot_allocation_strategy: str = "price-capacity-optimized",
) -> dict[str, Any]:
    """CreateFleet arguments for an instant fleet of `count` instances (pure).

    One override per (instance type, subnet), or per (type, zone) without subnets, or per type.
    Types are given cheapest-useful first; the order is kept as override priority.
    """
    if lifecycle not in ("spot", "on-demand"):
        raise ValueError(f"lifecycle must be spot or on-demand, got {lifecycle!r}")
    if not instance_types:
        raise ValueError("no instance types to launch")
    overrides: list[dict[str, Any]] = []
    for priority, itype in enumerate(instance_types):
        places: list[dict[str, str]] = ([{"SubnetId": s} for s in subnets] or
                                        [{"AvailabilityZone": z} for z in zones] or [{}])
        for place in places:
            overrides.append({"InstanceType": itype, "Priority": float(priority), **place})
    target: dict[str, Any] = {"TotalTargetCapacity": count, "DefaultTargetCapacityType": lifecycle}
    target["SpotTargetCapacity" if lifecycle == "spot" else "OnDemandTargetCapacity"] = count
    request: dict[str, Any] = {
        "Type": "instant",
        "LaunchTemplateConfigs": [{
            "LaunchTemplateSpecification": {"LaunchTemplateId": launch_template_id, "Version": version},
            "Overrides": overrides,
        }],
        "TargetCapacitySpecification": target,
        "TagSpecifications": [{"ResourceType": "instance", "Tags": [
            {"Key": TAG_JOB, "Value": job_id}, {"Key": TAG_CLUSTER, "Value": cluster}]}],
    }
    if lifecycle == "spot":
        request["SpotOptions"] = {"AllocationStrategy": spot_allocation_strategy}
    else:
        request["OnDemandOptions"] = {"AllocationStrategy": "prioritized"}
    return request


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def _node(instance: dict[str, Any]) -> ProviderNode:
    tags = _tags(instance)
    state = instance.get("State", {}).get("Name", "")
    return ProviderNode(
        handle=instance["InstanceId"],
        job_id=tags.get(TAG_JOB, ""),
        instance_type=instance.get("InstanceType", ""),
        zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
        lifecycle="spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
        state=state if state in ("pending", "running") else "terminated",
        tags=tags,
    )


class Ec2Provider(Provider):
    """Provider over EC2 CreateFleet or an auto scaling group. Thread-safe for one daemon."""

    name = "ec2"

    def __init__(self, config: Ec2Config, *, ec2_client: Any = None, autoscaling_client: Any = None):
        self.config = config
        self._ec2 = ec2_client
        self._asg = autoscaling_client
        self._lock = threading.Lock()
        self._template_versions: dict[str, tuple[str, str]] = {}
        self._asg_owed: dict[str, int] = {}

    # ---- plumbing --------------------------------------------------------------------------

    def _aws(self) -> AwsConfig:
        return AwsConfig(region=self.config.region, endpoint_url=self.config.endpoint_url,
                         timeout_s=self.config.timeout_s, max_attempts=self.config.max_attempts)

    def _ec2_client(self) -> Any:
        if self._ec2 is None:
            self._ec2 = aws_client("ec2", self._aws())
        return self._ec2

    def _asg_client(self) -> Any:
        if self._asg is None:
            self._asg = aws_client("autoscaling", self._aws())
        return self._asg

    def _call(self, service: str, operation: str, tried: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except aws_call_errors() as exc:
            raise ProviderError(f"{service}:{operation} failed ({error_code(exc)}: {exc}); tried {tried}") from exc

    def _describe(self, filters: list[dict[str, Any]], tried: str) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Filters": filters, "MaxResults": 1000}
        for _ in range(100):  # bounded pagination: 100k instances is past any fleet of ours
            page = self._call("ec2", "DescribeInstances", tried, self._ec2_client().describe_instances, **kwargs)
            for reservation in page.get("Reservations", []):
                instances.extend(reservation.get("Instances", []))
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
        return instances

    def _ours(self, *, job_id: str | None = None, states: Sequence[str] = LIVE_STATES,
              instance_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        filters: list[dict[str, Any]] = [
            {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.config.cluster]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
        if job_id is not None:
            filters.append({"Name": f"tag:{TAG_JOB}", "Values": [job_id]})
        if instance_ids is not None:
            filters.append({"Name": "instance-id", "Values": list(instance_ids)})
        return self._describe(filters, f"instances of cluster {self.config.cluster!r}"
                              + (f" job {job_id!r}" if job_id else ""))

    def _tag_nodes(self, instance_ids: Sequence[str], job_id: str) -> None:
        for iid in instance_ids:
            self._call("ec2", "CreateTags", f"tagging {iid} for job {job_id!r}", self._ec2_client().create_tags,
                       Resources=[iid], Tags=[{"Key": TAG_JOB, "Value": job_id}, {"Key": TAG_NODE, "Value": iid},
                                              {"Key": TAG_CLUSTER, "Value": self.config.cluster}])

    # ---- launch ----------------------------------------------------------------------------

    def launch(self, request: NodeRequest, count: int) -> list[ProviderNode]:
        if count <= 0:
            return []
        if request.market not in MARKETS:
            raise ValueError(f"market must be one of {MARKETS}, got {request.market!r}")
        if self.config.auto_scaling_group:
            return self._launch_asg(request, count)
        types = tuple(request.instance_types) or self.config.instance_types
        if request.market == "on-demand":
            launched = self._launch_fleet(request, types, count, "on-demand")
        else:
            try:
                launched = self._launch_fleet(request, types, count, "spot",
                                              raise_if_none=request.market == "spot")
            except ProviderError as exc:
                if request.market == "spot":
                    raise
                log.warning("job %s: spot launch failed (%s); falling back to on-demand", request.job_id, exc)
                launched = []
            short = count - len(launched)
            if request.market == "spot-with-fallback" and short > 0:
                log.info("job %s: spot gave %d of %d nodes, asking on-demand for %d",
                         request.job_id, len(launched), count, short)
                launched += self._launch_fleet(request, types, short, "on-demand")
        return launched

    def _template_version(self, daemon_address: str) -> tuple[str, str]:
        """(template id, version) whose user data starts the agent for `daemon_address`."""
        with self._lock:
            if daemon_address in self._template_versions:
                return self._template_versions[daemon_address]
        lt = self.config.launch_template
        key = {"LaunchTemplateId": lt} if lt.startswith("lt-") else {"LaunchTemplateName": lt}
        tried = f"launch template {lt!r} version {self.config.launch_template_version}"
        found = self._call("ec2", "DescribeLaunchTemplateVersions", tried,
                           self._ec2_client().describe_launch_template_versions,
                           Versions=[self.config.launch_template_version], **key)
        versions = found.get("LaunchTemplateVersions", [])
        if not versions:
            raise ProviderError(f"ec2:DescribeLaunchTemplateVersions found nothing; tried {tried}")
        base = versions[0]
        data = dict(base["LaunchTemplateData"])
        data["UserData"] = base64.b64encode(agent_user_data(daemon_address, self.config.agent_command).encode()).decode()
        # The whole data is passed (not SourceVersion) so the new version is self-contained.
        made = self._call("ec2", "CreateLaunchTemplateVersion", tried + " with agent user data",
                          self._ec2_client().create_launch_template_version,
                          LaunchTemplateId=base["LaunchTemplateId"], LaunchTemplateData=data,
                          VersionDescription=f"spotwise agent -> {daemon_address}"[:255])
        result = (base["LaunchTemplateId"], str(made["LaunchTemplateVersion"]["VersionNumber"]))
        with self._lock:
            self._template_versions[daemon_address] = result
        return result

    def _launch_fleet(self, request: NodeRequest, types: Sequence[str], count: int, lifecycle: str,
                      *, raise_if_none: bool = True) -> list[ProviderNode]:
        if not request.daemon_address:
            raise ValueError("NodeRequest.daemon_address is required for EC2 nodes (the agent's user data)")
        template_id, version = self._template_version(request.daemon_address)
        args = fleet_request(
            launch_template_id=template_id, version=version, instance_types=types,
            subnets=self.config.subnets, zones=self.config.zones, count=count, lifecycle=lifecycle,
            job_id=request.job_id, cluster=self.config.cluster,
            spot_allocation_strategy=self.config.spot_allocation_strategy)
        places = ", ".join(self.config.subnets or self.config.zones) or "any zone"
        tried = f"{count} x {lifecycle} of [{', '.join(types)}] in {places} for job {request.job_id!r}"
        answer = self._call("ec2", "CreateFleet", tried, self._ec2_client().create_fleet, **args)
        ids = [iid for group in answer.get("Instances", []) for iid in group.get("InstanceIds", [])]
        errors = [f"{e.get('ErrorCode')}: {e.get('ErrorMessage')}" for e in answer.get("Errors", [])]
        if not ids:
            message = f"ec2:CreateFleet launched nothing ({'; '.join(errors) or 'no error given'}); tried {tried}"
            if raise_if_none:
                raise ProviderError(message)
            log.warning(message)
            return []
        if len(ids) < count:
            log.warning("job %s: CreateFleet launched %d of %d (%s)", request.job_id, len(ids), count, "; ".join(errors))
        self._tag_nodes(ids, request.job_id)
        nodes = [_node(i) for i in self._ours(instance_ids=ids, states=("pending", "running"))]
        log.info("job %s: launched %s", request.job_id, ", ".join(f"{n.handle} ({n.instance_type} {n.zone} "
                                                                   f"{n.lifecycle})" for n in nodes))
        return nodes

    # ---- auto scaling group ----------------------------------------------------------------

    def _group(self) -> dict[str, Any]:
        name = self.config.auto_scaling_group
        found = self._call("autoscaling", "DescribeAutoScalingGroups", f"group {name!r}",
                           self._asg_client().describe_auto_scaling_groups, AutoScalingGroupNames=[name])
        groups = found.get("AutoScalingGroups", [])
        if not groups:
            raise ProviderError(f"autoscaling:DescribeAutoScalingGroups: no group named {name!r}")
        return groups[0]

    def _launch_asg(self, request: NodeRequest, count: int) -> list[ProviderNode]:
        name = self.config.auto_scaling_group
        group = self._group()
        desired = int(group["DesiredCapacity"])
        target = min(desired + count, int(group["MaxSize"]))
        if target == desired:
            raise ProviderError(f"autoscaling group {name!r} is at its MaxSize {group['MaxSize']}; "
                                f"tried to add {count} for job {request.job_id!r}")
        self._call("autoscaling", "SetDesiredCapacity", f"group {name!r} {desired} -> {target}",
                   self._asg_client().set_desired_capacity, AutoScalingGroupName=name,
                   DesiredCapacity=target, HonorCooldown=False)
        with self._lock:
            self._asg_owed[request.job_id] = self._asg_owed.get(request.job_id, 0) + (target - desired)
        return [n for n in self._claim_asg_instances() if n.job_id == request.job_id]

    def _claim_asg_instances(self) -> list[ProviderNode]:
        """Tag the group's untagged instances for the jobs still owed nodes (oldest claim first)."""
        with self._lock:
            if not any(self._asg_owed.values()):
                return []
        ids = [i["InstanceId"] for i in self._group().get("Instances", [])]
        if not ids:
            return []
        instances = self._describe([{"Name": "instance-id", "Values": ids},
                                    {"Name": "instance-state-name", "Values": list(LIVE_STATES)}],
                                   f"instances of group {self.config.auto_scaling_group!r}")
        claimed: list[str] = []
        for iid in (i["InstanceId"] for i in instances if TAG_NODE not in _tags(i)):
            with self._lock:
                job = next((j for j, owed in self._asg_owed.items() if owed > 0), None)
                if job is None:
                    break
                self._asg_owed[job] -= 1
            self._tag_nodes([iid], job)
            claimed.append(iid)
        return [_node(i) for i in self._ours(instance_ids=claimed)] if claimed else []

    # ---- terminate / list ------------------------------------------------------------------

    def terminate(self, handles: Sequence[str]) -> None:
        if not handles:
            return
        ours = [i["InstanceId"] for i in self._ours(instance_ids=list(handles), states=LIVE_STATES + ("stopping", "stopped"))]
        unknown = sorted(set(handles) - set(ours))
        if unknown:
            log.info("terminate: ignoring handles that are not live instances of ours: %s", ", ".join(unknown))
        if not ours:
            return
        if self.config.auto_scaling_group:
            group_ids = {i["InstanceId"] for i in self._group().get("Instances", [])}
            for iid in [i for i in ours if i in group_ids]:
                self._call("autoscaling", "TerminateInstanceInAutoScalingGroup",
                           f"{iid} in group {self.config.auto_scaling_group!r}",
                           self._asg_client().terminate_instance_in_auto_scaling_group,
                           InstanceId=iid, ShouldDecrementDesiredCapacity=True)
            ours = [i for i in ours if i not in group_ids]
        if ours:
            self._call("ec2", "TerminateInstances", ", ".join(ours), self._ec2_client().terminate_instances,
                       InstanceIds=ours)
        log.info("terminated %s", ", ".join(sorted(set(handles) - set(unknown))))

    def terminate_job(self, job_id: str) -> list[str]:
        """Terminate every instance of `job_id` (on cancel or at the end); returns their ids."""
        with self._lock:
            self._asg_owed.pop(job_id, None)
        handles = [i["InstanceId"] for i in self._ours(job_id=job_id, states=LIVE_STATES + ("stopping", "stopped"))]
        self.terminate(handles)
        return handles

    def wait_terminated(self, handles: Sequence[str], *, timeout_s: float = 300.0, poll_s: float = 5.0) -> bool:
        """Poll (with backoff, bounded by timeout_s) until none of `handles` is pending or running."""
        deadline = time.monotonic() + timeout_s
        delay = min(poll_s, 1.0)
        while True:
            if not self._ours(instance_ids=list(handles), states=LIVE_STATES + ("shutting-down",)):
                return True
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, poll_s)

    def list_nodes(self) -> list[ProviderNode]:
        if self.config.auto_scaling_group:
            self._claim_asg_instances()
        return [_node(i) for i in self._ours() if TAG_JOB in _tags(i)]
