"""The ray provider's pure rules: which nodes are eligible, what an agent holds, what the
autoscaler is asked for, and how a node is priced."""

from __future__ import annotations

import pytest

from spotwise.cloud.ray import (
    RayConfig,
    RayNode,
    autoscale_request,
    eligible,
    node_identity,
    reservation,
)

CPU_NODE = RayNode(node_id="a", alive=True, resources={"CPU": 4})
MARKED = RayNode(node_id="b", alive=True, resources={"CPU": 1, "spotwise_node": 1},
                 labels={"ray.io/node-group": "spot", "ray.io/availability-zone": "us-east-1a",
                         "itype": "g5.xlarge", "market": "on-demand"})
GPU_NODE = RayNode(node_id="c", alive=True, resources={"CPU": 8, "GPU": 4},
                   labels={"ray.io/node-group": "spot"})


def test_eligibility_by_resource_gpus_and_labels() -> None:
    by_resource = RayConfig(resource="spotwise_node")
    assert [eligible(n, by_resource) for n in (CPU_NODE, MARKED, GPU_NODE)] == [False, True, False]
    by_gpus = RayConfig(gpus_per_node=4)
    assert [eligible(n, by_gpus) for n in (CPU_NODE, MARKED, GPU_NODE)] == [False, False, True]
    assert not eligible(GPU_NODE, RayConfig(gpus_per_node=8))
    labelled = RayConfig(gpus_per_node=1, labels={"ray.io/node-group": "spot"})
    assert eligible(GPU_NODE, labelled)
    assert not eligible(GPU_NODE, RayConfig(gpus_per_node=1, labels={"ray.io/node-group": "x"}))
    dead = RayNode(node_id="d", alive=False, resources={"spotwise_node": 1})
    assert not eligible(dead, by_resource)


def test_the_agent_holds_all_of_the_resource_and_every_gpu() -> None:
    assert reservation(MARKED, RayConfig(resource="spotwise_node")) == {"spotwise_node": 1.0}
    assert reservation(GPU_NODE, RayConfig(gpus_per_node=2)) == {"GPU": 4.0}
    both = RayNode(node_id="e", alive=True, resources={"spotwise_node": 2, "GPU": 8})
    assert reservation(both, RayConfig(resource="spotwise_node")) == {"spotwise_node": 2.0,
                                                                     "GPU": 8.0}


def test_autoscaler_request_counts_every_wanted_node() -> None:
    config = RayConfig(resource="spotwise_node", gpus_per_node=8,
                       labels={"ray.io/node-group": "spot"})
    bundles, selectors = autoscale_request(config, 3)
    assert bundles == [{"spotwise_node": 1.0, "GPU": 8.0}] * 3
    assert selectors == [{"ray.io/node-group": "spot"}] * 3
    assert autoscale_request(config, 0) == ([], [])


def test_identity_from_labels_or_config() -> None:
    plain = RayConfig(resource="spotwise_node", instance_type="p4d.24xlarge")
    assert node_identity(MARKED, plain) == ("p4d.24xlarge", "spot", "us-east-1a")
    labelled = RayConfig(resource="spotwise_node", instance_type_label="itype",
                         lifecycle_label="market")
    assert node_identity(MARKED, labelled) == ("g5.xlarge", "on-demand", "us-east-1a")
    # A node without the labels falls back to the config.
    assert node_identity(GPU_NODE, labelled) == ("ray", "spot", "")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "resource or gpus_per_node"),
    ({"resource": "x", "address": ""}, "address"),
    ({"resource": "x", "namespace": ""}, "namespace"),
    ({"resource": "x", "lifecycle": "reserved"}, "lifecycle"),
    ({"resource": "x", "price_per_hour": -1.0}, "price_per_hour"),
    ({"gpus_per_node": -2}, "resource or gpus_per_node"),
])
def test_bad_config_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RayConfig(**kwargs)
