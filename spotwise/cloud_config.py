"""The daemon's cloud tables, typed and validated with it: where prices come from
(`[daemon.pricing]`), the EC2 provider (`[daemon.ec2]`) and the Ray provider (`[daemon.ray]`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PricingSettings(BaseModel):
    """Where the daemon's prices come from (the `[daemon.pricing]` table)."""

    model_config = ConfigDict(extra="forbid")

    offline: bool | None = Field(
        None,
        description="Use only the dated offline price table shipped with spotwise (no AWS calls); "
        "default: offline unless provider is ec2.",
    )
    region: str = Field(
        "", description="Region whose prices count; empty = the [daemon.ec2] region."
    )
    pricing_region: str = Field(
        "us-east-1",
        description="Region of the Pricing API endpoint (us-east-1, eu-central-1 or ap-south-1).",
    )
    ec2_endpoint_url: str = Field(
        "",
        description="EC2 endpoint for the spot price history (a test server); empty = the "
        "[daemon.ec2] endpoint_url, or AWS.",
    )
    pricing_endpoint_url: str = Field(
        "", description="Pricing API endpoint override (a test server); empty = AWS."
    )
    spot_max_age_s: float = Field(
        300.0, gt=0, description="A cached spot price older than this is fetched again."
    )
    on_demand_max_age_s: float = Field(
        86400.0, gt=0, description="A cached on-demand price older than this is fetched again."
    )
    refresh_s: float = Field(
        60.0, gt=0, description="How often the daemon asks the price book for its nodes' prices."
    )
    timeout_s: float = Field(5.0, gt=0, description="HTTP timeout of each pricing call.")
    unpriced_usd_per_hour: float | None = Field(
        None,
        gt=0,
        description="What a node that no price source knows is charged per hour (never $0, so "
        "a budget stops a job on unpriced machines); default: the offline table's dearest "
        "on-demand price.",
    )


class Ec2Settings(BaseModel):
    """The EC2 provider (the `[daemon.ec2]` table, used when provider = "ec2")."""

    model_config = ConfigDict(extra="forbid")

    region: str = Field("us-east-1", description="AWS region of the fleet.")
    endpoint_url: str = Field(
        "", description="EC2 and Auto Scaling endpoint override (a test server); empty = AWS."
    )
    launch_template: str = Field(
        "", description="Launch template id (lt-...) or name for CreateFleet."
    )
    launch_template_version: str = Field(
        "$Default", description="Version of the launch template the agent's user data is added to."
    )
    auto_scaling_group: str = Field(
        "", description="Scale this existing auto scaling group instead of calling CreateFleet."
    )
    subnets: list[str] = Field(
        default_factory=list, description="Subnet ids to spread over; empty = zones, or any."
    )
    zones: list[str] = Field(
        default_factory=list, description="Availability zones to spread over when no subnets are given."
    )
    instance_types: list[str] = Field(
        default_factory=lambda: ["g4dn.xlarge"],
        description="Instance types for jobs whose spec names none.",
    )
    cluster: str = Field(
        "default", description="Value of the spotwise:cluster tag (keeps two daemons apart)."
    )
    agent_command: str = Field(
        "spotwise agent", description="Command that starts the agent on a new machine."
    )
    spot_allocation_strategy: str = Field(
        "price-capacity-optimized", description="CreateFleet's spot allocation strategy."
    )
    timeout_s: float = Field(30.0, gt=0, description="HTTP timeout of each AWS call.")
    max_attempts: int = Field(3, ge=1, description="Attempts per AWS call (with backoff).")

    def ec2_config(self) -> Any:
        """The provider's spotwise.cloud.ec2.Ec2Config; ValueError if it cannot launch."""
        from spotwise.cloud.ec2 import Ec2Config

        return Ec2Config(
            region=self.region, endpoint_url=self.endpoint_url or None,
            launch_template=self.launch_template,
            launch_template_version=self.launch_template_version,
            auto_scaling_group=self.auto_scaling_group, subnets=tuple(self.subnets),
            zones=tuple(self.zones), instance_types=tuple(self.instance_types),
            cluster=self.cluster, agent_command=self.agent_command,
            spot_allocation_strategy=self.spot_allocation_strategy, timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
        )


class RaySettings(BaseModel):
    """The Ray provider (the `[daemon.ray]` table, used when provider = "ray")."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(
        "auto", description="Ray cluster: auto, a GCS host:port, or ray://host:port (Ray Client)."
    )
    namespace: str = Field(
        "spotwise", description="Ray namespace of the agent actors (one per daemon)."
    )
    resource: str = Field(
        "", description="Custom resource marking eligible nodes; the agent holds all of it."
    )
    gpus_per_node: int = Field(
        0, ge=0, description="GPUs an eligible node must have; the agent holds all its GPUs."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Node labels an eligible node must carry."
    )
    instance_type: str = Field(
        "ray", description="Instance type of a node without an instance-type label (pricing)."
    )
    instance_type_label: str = Field(
        "", description="Node label naming a node's instance type; empty = none."
    )
    price_per_hour: float = Field(
        0.0, ge=0, description="USD per node-hour; 0 = the price table for the instance type."
    )
    lifecycle: Literal["spot", "on-demand"] = Field(
        "spot", description="Lifecycle of nodes without a lifecycle label."
    )
    lifecycle_label: str = Field(
        "", description="Node label saying spot or on-demand; empty = none."
    )
    zone_label: str = Field(
        "ray.io/availability-zone", description="Node label naming a node's zone."
    )
    work_dir: str = Field(
        "", description="Agents' state and logs on each node; default /tmp/spotwise-ray/<namespace>."
    )
    autoscale: bool = Field(
        True, description="Ask Ray's autoscaler for nodes when jobs want more than exist."
    )
    drain_poll_s: float = Field(
        0.5, gt=0, description="How often the daemon reads Ray's drain table."
    )
    call_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for one answer from an agent actor."
    )

    def ray_config(self, *, grace_s: float = 30.0) -> Any:
        """The provider's spotwise.cloud.ray.RayConfig; ValueError if it names no eligibility
        resource."""
        from spotwise.cloud.ray import RayConfig

        return RayConfig(
            address=self.address, namespace=self.namespace, resource=self.resource,
            gpus_per_node=self.gpus_per_node, labels=dict(self.labels),
            instance_type=self.instance_type, instance_type_label=self.instance_type_label,
            price_per_hour=self.price_per_hour, lifecycle=self.lifecycle,
            lifecycle_label=self.lifecycle_label, zone_label=self.zone_label,
            work_dir=self.work_dir, grace_s=grace_s, call_timeout_s=self.call_timeout_s,
            autoscale=self.autoscale,
        )
