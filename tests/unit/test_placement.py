"""`resources.*_placement` (pack | spread | a node resource) checked in the config and translated into
placement-group strategies and bundles; the node names `raylign cluster up` gives."""

from __future__ import annotations

import pytest

from raylign.config import ConfigError, load_config
from raylign.localcluster import node_name
from raylign.runtime import ResourceError
from raylign.workers.group import NODE_RESOURCE_SHARE, check_node_resource, placement_options


def test_pack_and_spread_are_placement_group_strategies_with_the_bundle_unchanged():
    bundle = {"CPU": 0.5, "GPU": 1.0}
    assert placement_options("pack", bundle) == ("PACK", bundle)
    assert placement_options("spread", bundle) == ("SPREAD", bundle)
    assert bundle == {"CPU": 0.5, "GPU": 1.0}  # not modified in place


def test_a_node_resource_puts_a_sliver_of_it_in_every_bundle():
    strategy, bundle = placement_options("node_b", {"CPU": 0.25})
    assert strategy == "PACK"
    assert bundle == {"CPU": 0.25, "node_b": NODE_RESOURCE_SHARE}
    assert NODE_RESOURCE_SHARE * 1000 <= 1  # a node offering {node_b: 1} hosts a thousand such actors


@pytest.mark.parametrize("key", ["learner_placement", "rollout_placement", "reward_placement"])
def test_the_config_accepts_strategies_and_resource_names_and_refuses_the_rest(key):
    for ok in ("pack", "spread", "node_c", "gpu-pool.a"):
        assert getattr(load_config("grpo", [f"resources.{key}={ok}"]).resources, key) == ok
    for bad in ("CPU", "GPU", "memory", "node a", "node:127.0.0.1", "1node"):
        with pytest.raises(ConfigError, match=f"resources.{key}.*pack, spread or the name of a node resource"):
            load_config("grpo", [f"resources.{key}={bad}"])


def test_a_node_resource_no_node_offers_fails_at_once_naming_what_exists():
    resources = {"CPU": 3.0, "node_a": 1.0, "node_b": 1.0, "memory": 1e9}
    check_node_resource("node_b", "rollout", resources)
    check_node_resource("spread", "rollout", resources)
    with pytest.raises(ResourceError, match=r"rollout group is placed on 'node_x'.*node resources: node_a, node_b"):
        check_node_resource("node_x", "rollout", resources)
    with pytest.raises(ResourceError, match="no node_\\* resources at all"):
        check_node_resource("node_a", "policy", {"CPU": 2.0})


def test_local_cluster_nodes_are_named_node_a_node_b_and_on():
    assert [node_name(i) for i in (0, 1, 2, 25, 26, 27)] == ["node_a", "node_b", "node_c", "node_z", "node_aa",
                                                                "node_ab"]
