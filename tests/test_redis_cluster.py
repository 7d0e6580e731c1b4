"""Thoughtwire on a real Redis Cluster: three masters, three replicas, sharded pub/sub."""

from __future__ import annotations

from tests.redis_cluster import RedisCluster


def test_the_fixture_serves_every_slot_from_three_masters(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    shards = redis_cluster.shards()
    assert all(len(s.replicas) == 1 for s in shards.values())
    port = redis_cluster.master_of("tw:s:{abc}:log")
    assert redis_cluster.slot_of("tw:s:{abc}:log") == redis_cluster.slot_of("abc")
    assert port in masters


def test_the_fixture_moves_a_slot_and_promotes_a_replica(redis_cluster: RedisCluster) -> None:
    key = "fixture:{moving}"
    source = redis_cluster.master_of(key)
    redis_cluster.node(source).call("SET", key, "v")
    target = next(p for p in redis_cluster.masters() if p != source)
    redis_cluster.move_slot(redis_cluster.slot_of(key), target)
    assert redis_cluster.master_of(key) == target
    assert redis_cluster.node(target).call("GET", key) == "v"
    promoted = redis_cluster.kill_master(target)
    assert promoted != target and redis_cluster.master_of(key) == promoted
    redis_cluster.restart(target)
    assert target not in redis_cluster.masters()
