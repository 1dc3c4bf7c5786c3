"""Wire compatibility of the public messages with go-etcd-cron's ``api`` package."""

from __future__ import annotations

import pytest

from etcdcron._pb import api_pb2

pytestmark = pytest.mark.unit


def test_job_delete_event_numbers_match_go_etcd_cron():
    fields = {f.name: f.number for f in api_pb2.InformerEventJobDelete.DESCRIPTOR.fields}
    # go-etcd-cron: `int64 mod_revision = 1;` and nothing else; etcdcron's name is 1000 and up
    assert fields == {"mod_revision": 1, "name": 1000}


def test_a_go_etcd_cron_delete_event_decodes_with_its_mod_revision():
    go_bytes = b"\x08\xac\x02"
    event = api_pb2.InformerEventJobDelete.FromString(go_bytes)
    assert (event.mod_revision, event.name) == (300, "")


def test_an_etcdcron_delete_event_puts_mod_revision_where_go_etcd_cron_reads_it():
    wire = api_pb2.InformerEventJobDelete(mod_revision=300, name="job").SerializeToString()
    assert wire.startswith(b"\x08\xac\x02")  # field 1, varint 300
    assert wire[3:] == b"\xc2\x3e\x03job"  # field 1000, length-delimited: (1000 << 3 | 2)
