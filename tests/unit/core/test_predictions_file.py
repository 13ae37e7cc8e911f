"""The one reader of the predictions JSONL every layer exchanges."""

import pytest

from clear_core.errors import InvalidInputError
from clear_core.predictions import read_predictions


def test_rows_in_file_order(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "threshold_tokens": 120.5, "log_sigma": 0.4}\n\n'
                 '{"id": "b", "threshold_tokens": 30, "prompt": "2+2?"}\n')
    t = read_predictions(f)
    assert [r.id for r in t.rows] == ["a", "b"]
    assert t.thresholds == {"a": 120.5, "b": 30.0} and t.log_sigmas == [0.4]
    assert t.rows[1].prompt == "2+2?" and t.rows[1].log_sigma is None


@pytest.mark.parametrize("line, match", [
    ('{"id": "a"}', r"p.jsonl:1"),
    ('{"id": "a", "threshold_tokens": -1}', "threshold_tokens"),
    ('{"id": "a", "threshold_tokens": 5, "log_sigma": -0.1}', "log_sigma"),
    ("{not json", r"p.jsonl:1"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "p.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(InvalidInputError, match=match):
        read_predictions(f)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        read_predictions(tmp_path / "nope.jsonl")
