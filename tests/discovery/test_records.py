"""The registration layout: keys under /services/, validated names, JSON instance records."""

from __future__ import annotations

import json
import os
import re

import pytest

from troupe.errors import ConfigError, DiscoveryError, InvalidName, InvalidRecord
from troupe.messages import (
    WIRE_VERSION,
    InstanceKey,
    InstanceRecord,
    decode_record,
    encode_record,
    endpoint_prefix,
    instance_key,
    new_instance_id,
    parse_key,
    services_prefix,
)

ID = "694d98147d54be25"


def record(**changes: object) -> InstanceRecord:
    fields: dict[str, object] = {
        "namespace": "vllm-agg",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": ID,
        "transport": {"tcp": "tcp://127.0.0.1:4000"},
        "host": "worker-1",
        "pid": 4242,
        "started_at": 1_700_000_000.5,
        "metadata": {"gpu": "a100", "slots": 4},
        "wire": WIRE_VERSION,
    }
    fields.update(changes)
    return InstanceRecord(**fields)  # type: ignore[arg-type]


def test_instance_ids_are_sixteen_lower_case_hex_digits() -> None:
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


def test_the_key_layout_is_the_seeds() -> None:
    assert instance_key("vllm-agg", "backend", "generate", ID) == (
        "/services/vllm-agg/backend/generate/694d98147d54be25"
    )
    assert endpoint_prefix("ns", "comp", "ep") == "/services/ns/comp/ep"
    assert services_prefix() == "/services"
    assert services_prefix("ns") == "/services/ns"
    assert services_prefix("ns", "comp") == "/services/ns/comp"
    parsed = parse_key("/services/vllm-agg/backend/generate/694d98147d54be25")
    assert parsed == InstanceKey("vllm-agg", "backend", "generate", ID)
    assert parsed.key == "/services/vllm-agg/backend/generate/694d98147d54be25"


@pytest.mark.parametrize(
    ("args", "part"),
    [
        (("Bad", "comp", "ep", ID), "namespace"),
        (("ns", "comp.x", "ep", ID), "component"),
        (("ns", "comp", "ep/1", ID), "endpoint"),
        (("ns", "comp", "", ID), "endpoint"),
        (("ns", "comp", "ep", "694D98147D54BE25"), "instance_id"),
        (("ns", "comp", "ep", "1234"), "instance_id"),
    ],
)
def test_bad_names_are_clear_errors_never_bad_keys(args: tuple[str, ...], part: str) -> None:
    with pytest.raises(InvalidName) as info:
        instance_key(*args)
    assert info.value.variable == part
    assert isinstance(info.value, ConfigError)
    assert part in str(info.value)


def test_a_prefix_needs_its_enclosing_names() -> None:
    with pytest.raises(InvalidName) as info:
        services_prefix(None, "comp")
    assert info.value.variable == "namespace"


@pytest.mark.parametrize(
    "key",
    [
        "/services/ns/comp/ep",
        "/services/ns/comp/ep/694d98147d54be25/extra",
        "services/ns/comp/ep/694d98147d54be25",
        "/v1/instances/ns/comp/ep/694d98147d54be25",
        "/services/ns/comp/ep/not-hex-at-all!",
        "/services/NS/comp/ep/694d98147d54be25",
    ],
)
def test_keys_off_the_layout_are_invalid_records(key: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        parse_key(key)
    assert info.value.key == key
    assert isinstance(info.value, DiscoveryError)


def test_records_are_readable_json_and_round_trip() -> None:
    rec = record()
    data = encode_record(rec)
    shown = json.loads(data)
    assert shown == {
        "namespace": "vllm-agg",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": ID,
        "transport": {"tcp": "tcp://127.0.0.1:4000"},
        "host": "worker-1",
        "pid": 4242,
        "started_at": 1_700_000_000.5,
        "metadata": {"gpu": "a100", "slots": 4},
        "wire": 1,
        "resumable": False,
    }
    assert decode_record(data, key=rec.key) == rec
    assert rec.key == f"/services/vllm-agg/backend/generate/{ID}"


def test_create_fills_in_this_process() -> None:
    rec = InstanceRecord.create(
        "ns", "comp", "ep", instance_id=ID, transport={"nats": "ns_comp.ep-1"}
    )
    assert rec.pid == os.getpid()
    assert rec.host
    assert rec.started_at > 1_700_000_000
    assert rec.metadata == {}
    assert rec.wire == WIRE_VERSION == 1


def test_the_wire_version_round_trips_and_create_can_set_it() -> None:
    for wire in (0, 1, 7):
        rec = record(wire=wire)
        decoded = decode_record(encode_record(rec), key=rec.key)
        assert decoded == rec
        assert decoded.wire == wire
    old = InstanceRecord.create("ns", "comp", "ep", instance_id=ID, transport={}, wire=0)
    assert json.loads(encode_record(old))["wire"] == 0


def test_records_written_before_the_wire_field_decode_as_version_0() -> None:
    shown = json.loads(encode_record(record()))
    del shown["wire"]
    old = decode_record(json.dumps(shown).encode())
    assert old.wire == 0
    assert old == record(wire=0)


def test_a_record_built_with_a_bad_name_is_refused() -> None:
    with pytest.raises(InvalidName) as info:
        record(component="Backend")
    assert info.value.variable == "component"


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"{}",
        b'{"namespace": "ns"}',
        json.dumps({**json.loads(encode_record(record())), "pid": "x"}).encode(),
        json.dumps({**json.loads(encode_record(record())), "namespace": "Bad NS"}).encode(),
        json.dumps({**json.loads(encode_record(record())), "wire": "1"}).encode(),
    ],
)
def test_undecodable_records_raise_invalid_record(data: bytes) -> None:
    with pytest.raises(InvalidRecord):
        decode_record(data)


def test_unknown_fields_are_ignored_for_newer_writers() -> None:
    data = json.dumps({**json.loads(encode_record(record())), "device_type": "Cuda"}).encode()
    assert decode_record(data) == record()


def test_a_record_under_someone_elses_key_is_invalid() -> None:
    data = encode_record(record())
    with pytest.raises(InvalidRecord) as info:
        decode_record(data, key="/services/vllm-agg/backend/generate/0000000000000000")
    assert "belongs at" in str(info.value)
