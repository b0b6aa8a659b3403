"""``bench/recbole_peer.py``'s S3Rec -> RecBole atomic-file conversion (the peer itself needs RecBole)."""

from __future__ import annotations

import importlib.util

from support import REPO


def _peer():
    spec = importlib.util.spec_from_file_location("recbole_peer", REPO / "bench" / "recbole_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_s3rec_lines_become_one_interaction_per_item_with_its_position_as_time(tmp_path):
    src = tmp_path / "Tiny.txt"
    src.write_text("1 5 6 7\n2 6 5\n")
    n = _peer().write_atomic(src, tmp_path / "atomic", "tiny")
    rows = (tmp_path / "atomic" / "tiny" / "tiny.inter").read_text().splitlines()
    assert n == 5
    assert rows[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert rows[1:] == ["1\t5\t0", "1\t6\t1", "1\t7\t2", "2\t6\t0", "2\t5\t1"]
