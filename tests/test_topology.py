import itertools

import pytest

from tierzero.parallel.topology import (
    Level, Topology, TopologyConfig, concurrent_busbw_gbps, crossing_level, default_level_names, emulated_topology,
    peak_busbw_gbps, preset_topology,
)


def test_emulate_two_by_two():
    t = emulated_topology([2, 2])
    assert t.names == ("node", "cluster")
    assert t.world_size == 4 and t.num_nodes == 2 and t.ranks_per_node == 2
    assert [t.coords(r) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert t.groups_within("node") == [[0, 1], [2, 3]]
    assert t.groups_across("node") == [[0, 2], [1, 3]]
    assert t.groups_within("cluster") == [[0, 1, 2, 3]]


@pytest.mark.parametrize("sizes", [[2, 4, 3], [8, 2], [1, 5], [3, 1, 2, 2]])
def test_coords_roundtrip_and_groups_partition(sizes):
    t = emulated_topology(sizes)
    ranks = range(t.world_size)
    assert sorted(t.rank(t.coords(r)) for r in ranks) == list(ranks)
    # every coordinate tuple appears exactly once
    assert {t.coords(r) for r in ranks} == set(itertools.product(*[range(s) for s in sizes]))
    for name in t.names:
        within = t.groups_within(name)
        across = t.groups_across(name)
        assert sorted(sum(within, [])) == list(ranks)
        assert sorted(sum(across, [])) == list(ranks)
        # a within-group and an across-group meet in exactly one rank
        for g in within:
            for h in across:
                assert len(set(g) & set(h)) == 1
        # ranks in one within-group share all outer coordinates
        k = t.level_index(name)
        for g in within:
            assert len({t.coords(r)[k + 1:] for r in g}) == 1


def test_level_names():
    assert default_level_names(1) == ["cluster"]
    assert default_level_names(3) == ["package", "node", "cluster"]
    assert default_level_names(4)[-3:] == ["package", "node", "cluster"]


def test_presets_match_background_numbers():
    f = preset_topology("frontier", 48)
    assert f.names == ("package", "node", "cluster")
    assert [lv.size for lv in f.levels] == [2, 4, 48]
    assert f.world_size == 384 and f.ranks_per_node == 8
    # achievable figures, below the datasheet peaks (OLCF user guide: 200 GB/s inside an MI250X,
    # 50 GB/s a single link between packages, 4 x 25 GB/s NICs shared by 8 GCDs)
    package, node, cluster = (lv.bandwidth_gbps for lv in f.levels)
    assert 0.7 * 200 <= package < 200 and 0.7 * 50 <= node < 50
    # LUMI's osu_mbw_mr: 95,000 MB/s per node, 8 GCDs sending at once
    assert cluster == pytest.approx(95_000 / 1e3 / 8, abs=0.05) and cluster * f.ranks_per_node < 4 * 25.0
    # a global ring: one flow leaves each node (8 x cluster) and each package (2 x node): the less
    assert peak_busbw_gbps(f, [list(range(f.world_size))]) == pytest.approx(min(8 * cluster, 2 * node))
    d = preset_topology("dgx-h100", 4)
    assert d.world_size == 32 and d.ranks_per_node == 8
    # nccl-tests on 8 H100s (~360 busbw), 46-48 GB/s per 400 Gb/s NIC, one per GPU
    assert d.levels[0].bandwidth_gbps == 360.0 and 46.0 <= d.levels[1].bandwidth_gbps < 50.0
    with pytest.raises(ValueError, match="frontier"):
        preset_topology("summit", 2)


def test_outermost_must_be_cluster():
    with pytest.raises(AssertionError):
        Topology((Level("node", 2), Level("rack", 2)))


def test_config_errors_name_the_key():
    assert TopologyConfig(emulate=[2, 2]).errors() == []
    assert any("topology.emulate" in e for e in TopologyConfig(emulate=[0, 2]).errors())
    assert any("topology.level_names" in e for e in TopologyConfig(emulate=[2, 2], level_names=["a"]).errors())
    assert any("topology.preset" in e for e in TopologyConfig(preset="nope").errors())
    assert any("both set" in e for e in TopologyConfig(preset="frontier", emulate=[2, 2]).errors())


def test_crossing_level_is_the_outermost_differing_coordinate():
    for sizes in ([2, 2], [2, 4, 3], [3, 1, 2, 2], [1, 5]):
        t = emulated_topology(sizes)
        for a, b in itertools.permutations(range(t.world_size), 2):
            ca, cb = t.coords(a), t.coords(b)
            assert crossing_level(t, a, b) == max(k for k in range(len(sizes)) if ca[k] != cb[k])


def test_concurrent_collectives_share_the_uplinks_they_both_use():
    b = 0.0625
    t = emulated_topology([2, 2], bandwidths_gbps=[10, b])
    ring = [[0, 1, 2, 3]]
    assert concurrent_busbw_gbps(t, [(ring, "ring")]) == [pytest.approx(2 * b)]
    # two global rings at once: two flows leave each node, b each
    assert concurrent_busbw_gbps(t, [(ring, "ring"), (ring, "ring")]) == [pytest.approx(b)] * 2
    # beside in-node pairs the ring keeps the node link; the pairs share 0->1 and 2->3 with it
    inside = [[0, 1], [2, 3]]
    assert concurrent_busbw_gbps(t, [(ring, "ring"), (inside, "ring")]) == [pytest.approx(2 * b), pytest.approx(5)]
    assert peak_busbw_gbps(t, inside) == pytest.approx(10)
    assert concurrent_busbw_gbps(t, [([[0], [1]], "ring")]) == [None]  # groups of one move nothing


def test_per_op_figures_survive_json_and_drop_when_the_link_changes():
    """The probe writes per-op figures to topology.json (lists); reading them back must give the
    same hashable level, and a level whose bandwidth is overridden loses its old op figures."""
    import json
    from dataclasses import asdict

    from tierzero.parallel.topology import Level, Topology, with_bandwidths

    t = with_bandwidths(emulated_topology([2, 2]), [0.2, 0.05], source="measured",
                        op_bandwidths_gbps=[None, {"all_gather": 0.05, "all_reduce": 0.07}])
    back = Topology(tuple(Level(**lv) for lv in json.loads(json.dumps([asdict(lv) for lv in t.levels]))),
                    source="measured")
    assert back == t and hash(back) == hash(t)
    assert back.levels[1].bandwidth_for("all_reduce") == 0.07
    assert back.levels[1].bandwidth_for("reduce_scatter") == 0.05  # not measured: the level's figure
    assert back.levels[0].bandwidth_for("all_reduce") == 0.2
    assert "all_reduce 0.07" in t.describe()
    assert with_bandwidths(t, [None, None]).levels[1].op_bandwidths_gbps == t.levels[1].op_bandwidths_gbps
    shaped = with_bandwidths(t, [None, 0.1])
    assert shaped.levels[1].op_bandwidths_gbps == () and shaped.levels[1].bandwidth_for("all_reduce") == 0.1
    # several collectives: each takes its own op's capacity on the link it loads
    ring = [[0, 1, 2, 3]]
    assert concurrent_busbw_gbps(t, [(ring, "ring", "all_reduce"), (ring, "ring", "all_gather")]) == [
        pytest.approx(0.07), pytest.approx(0.05)]


def test_a_per_flow_limit_caps_a_ring_across_nodes_but_not_the_pairs_that_load_the_link_at_once():
    """Level.flow_gbps (measured by the probe): one flow leaving a node carries at most that,
    whatever the node's uplink could carry; groups whose flows share the uplink below the
    limit are unchanged, and an all-to-all's flows each carry a 1/(n-1) share."""
    from tierzero.parallel.topology import with_flow_limits

    topo = emulated_topology([2, 2], bandwidths_gbps=[1.0, 0.06])
    world, pairs = [[0, 1, 2, 3]], topo.groups_across("node")
    assert peak_busbw_gbps(topo, world) == pytest.approx(0.12)  # one flow per node: the whole uplink
    capped = with_flow_limits(topo, [None, 0.08])
    assert peak_busbw_gbps(capped, world) == pytest.approx(0.08)
    assert peak_busbw_gbps(capped, pairs) == peak_busbw_gbps(topo, pairs) == pytest.approx(0.06)
    # all-to-all over all four: the uplink's load decides, each flow (1/3 of the bytes) under the cap
    assert peak_busbw_gbps(capped, world, "all_to_all") == peak_busbw_gbps(topo, world, "all_to_all")
    assert "one flow <= 0.08" in capped.describe()
