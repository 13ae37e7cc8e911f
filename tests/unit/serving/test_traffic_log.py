"""The traffic log (deployments.traffic_log): bounded, rotated segments, read back whole."""

from __future__ import annotations

import json

import pytest

from deployments.traffic_log import TrafficLog, TrafficRecord


def record(i: int, ended="natural", prompt="Write a function that adds two numbers.") -> TrafficRecord:
    return TrafficRecord(time=1000.0 + i, request_id=f"chatcmpl-{i}", tenant="default", model="clear-tiny",
                         prompt_sha256=TrafficRecord.prompt_hash(prompt), prediction_source="minilm-ridge",
                         predicted_threshold_tokens=300.0, raw_threshold_tokens=250.0, log_sigma=0.6, runaway=0.1,
                         cap_tokens=400, tokens=400 if ended == "cap" else 120, ended=ended,
                         features=[0.1, -0.2], prompt=prompt)


@pytest.mark.parametrize("url", ["DIR", "memory://clear-traffic-test"])
def test_records_come_back_in_order_and_segments_rotate_and_stay_bounded(tmp_path, url):
    url = str(tmp_path / "traffic") if url == "DIR" else url
    log = TrafficLog(url, segment_records=3, max_segments=2)
    for i in range(10):
        log.append(record(i, ended="cap" if i % 2 else "natural"))
    assert len(log.segments()) == 2  # 3 full segments written, the oldest deleted
    assert log.flush() is not None and len(log.segments()) == 2  # the tenth record's segment, one more deleted
    back = list(log.read())
    assert [r.request_id for r in back] == [f"chatcmpl-{i}" for i in (6, 7, 8, 9)]
    assert [r.censored for r in back] == [False, True, False, True]
    assert back[0].features == [0.1, -0.2] and back[0].raw_threshold_tokens == 250.0
    assert log.flush() is None  # nothing buffered, nothing written
    if url.startswith("memory://"):
        import fsspec

        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_prompts_are_kept_only_when_the_operator_turns_it_on(tmp_path):
    plain = TrafficLog(str(tmp_path / "a"), segment_records=1)
    plain.append(record(0))
    (got,) = plain.read()
    assert got.prompt is None and got.prompt_sha256 == TrafficRecord.prompt_hash(record(0).prompt)
    kept = TrafficLog(str(tmp_path / "b"), segment_records=1, store_prompts=True)
    kept.append(record(0))
    assert next(kept.read()).prompt == record(0).prompt


def test_a_bad_ending_is_refused_and_a_foreign_line_is_skipped(tmp_path):
    log = TrafficLog(str(tmp_path), segment_records=2)
    with pytest.raises(ValueError, match="ended"):
        log.append(record(0, ended="truncated"))
    log.append(record(1))
    path = log.flush()
    with open(path, "a") as f:
        f.write("not json\n" + json.dumps({"something": "else"}) + "\n")
    assert [r.request_id for r in log.read()] == ["chatcmpl-1"]
