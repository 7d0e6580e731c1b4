from thoughtwire.shared.keys import Keys


def key_slot_tag(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


def test_session_keys_share_one_hash_tag():
    keys = Keys("tw")
    names = [keys.session_log("s1"), keys.session_meta("s1"), keys.session_channel("s1")]
    assert {key_slot_tag(n) for n in names} == {"s1"}
    assert len(set(names)) == 3


def test_prefix_separates_deployments():
    assert Keys("a").jobs != Keys("b").jobs
    assert Keys("a").session_log("s") != Keys("b").session_log("s")


def test_client_and_broadcast_channels():
    keys = Keys("tw")
    assert keys.client_channel("bob") == "tw:client:{bob}"
    assert keys.broadcast_channel == "tw:broadcast"
    assert keys.node_channel("n1") != keys.broadcast_channel
