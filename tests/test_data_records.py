"""EditRecord validation: bad records raise RecordError naming file, index and field."""

from __future__ import annotations

import json

import pytest

from dualedit.data.mmedit import MMEditDataset
from dualedit.data.records import (
    HARD_FIELDS,
    MMEDIT_FIELDS,
    EditRecord,
    RecordError,
    apply_alt_policy,
    parse_record,
)


def good_record(**changes):
    record = {name: f"{name} value" for name in MMEDIT_FIELDS}
    record.update(image="edit/0.png", image_rephrase="rephrase/0.png", m_loc="loc/0.png")
    record.update(changes)
    return record


def write(tmp_path, records, name="vqa_train.json"):
    path = tmp_path / "vqa" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_parse_good_record_keeps_values_and_index():
    record = parse_record(good_record(alt="yellow"), file="f.json", index=7)
    assert isinstance(record, EditRecord)
    assert record.index == 7 and record.alt == "yellow" and record.m_loc == "loc/0.png"
    assert not record.has_hard and record.hard_m_loc is None
    assert record.to_dict() == good_record(alt="yellow")


def test_hard_fields_are_kept_together():
    hard = {"hard_m_loc": "loc/1.png", "hard_m_loc_q": "What colour?", "hard_m_loc_a": "red"}
    record = parse_record(good_record(**hard), file="f.json", index=0)
    assert record.has_hard and record.hard_m_loc_a == "red"
    assert record.to_dict()["hard_m_loc"] == "loc/1.png"
    partial = good_record(hard_m_loc="loc/1.png", hard_m_loc_q="What colour?")
    with pytest.raises(RecordError) as info:
        parse_record(partial, file="f.json", index=3)
    assert info.value.field == "hard_m_loc_a" and info.value.index == 3


@pytest.mark.parametrize("field", MMEDIT_FIELDS)
def test_missing_field_in_file_names_file_index_field(tmp_path, field):
    bad = good_record()
    del bad[field]
    path = write(tmp_path, [good_record(), good_record(), bad])
    with pytest.raises(RecordError) as info:
        MMEditDataset(path)
    message = str(info.value)
    assert str(path) in message and "record 2" in message and repr(field) in message
    assert "missing" in message
    assert (info.value.file, info.value.index, info.value.field) == (str(path), 2, field)


@pytest.mark.parametrize("value", [3, None, ["a"], {"a": 1}])
def test_wrong_type_names_file_index_field(tmp_path, value):
    path = write(tmp_path, [good_record(), good_record(loc_ans=value)])
    with pytest.raises(RecordError) as info:
        MMEditDataset(path)
    assert (info.value.index, info.value.field) == (1, "loc_ans")
    assert "expected a string" in str(info.value) and str(path) in str(info.value)


def test_other_bad_records(tmp_path):
    with pytest.raises(RecordError, match=r"record 0: expected a JSON object"):
        MMEditDataset(write(tmp_path, [["not", "a", "dict"]]))
    with pytest.raises(RecordError, match=r"record 1, field 'altt': unknown field"):
        MMEditDataset(write(tmp_path, [good_record(), good_record(altt="x")]))
    with pytest.raises(RecordError, match=r"record 0, field 'src': empty string"):
        MMEditDataset(write(tmp_path, [good_record(src="  ")]))
    for field in HARD_FIELDS:
        assert field not in MMEDIT_FIELDS


def test_bad_files(tmp_path):
    path = write(tmp_path, {"src": "not a list"})
    with pytest.raises(ValueError, match="expected a JSON list"):
        MMEditDataset(path)
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        MMEditDataset(path)
    with pytest.raises(FileNotFoundError, match="edit file not found"):
        MMEditDataset(tmp_path / "vqa" / "vqa_eval.json")
    with pytest.raises(ValueError, match="cannot infer the task"):
        MMEditDataset(write(tmp_path, [good_record()], name="edits.json"))
    assert (
        MMEditDataset(write(tmp_path, [good_record()], name="edits.json"), task="caption").task
        == "caption"
    )


def test_alt_policy():
    raw = good_record(alt=" A dog on a sofa.  \n")
    assert parse_record(raw, file="f", index=0).alt == "A dog on a sofa."
    assert parse_record(raw, file="f", index=0, alt_policy="keep").alt == " A dog on a sofa.  \n"
    assert apply_alt_policy("x\n", "keep") == "x\n"
    with pytest.raises(ValueError, match="unknown alt_policy"):
        parse_record(raw, file="f", index=0, alt_policy="rstrip")
