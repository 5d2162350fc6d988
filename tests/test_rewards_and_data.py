"""The arithmetic reward and the prompt loader (with its bad-input errors)."""

import json

import pytest

from glm_rl.rollout.data import DataError, load_prompts
from glm_rl.rollout.rewards import arithmetic_reward, get_reward_fn, parse_arithmetic_answer


@pytest.mark.parametrize(
    "response,label,reward",
    [
        ("123+456=579", "579", 1.0),  # correct, restated
        ("579", "579", 0.0),  # no '=': malformed
        ("123+456= 579 ", "579", 1.0),  # whitespace tolerated
        ("123+456=578", "579", 0.0),  # wrong
        ("123+456=", "579", 0.0),  # malformed: no number
        ("123+456=57a", "579", 0.0),  # malformed: junk after the number
        ("1=2=579", "579", 1.0),  # the last '=' counts
        ("", "3", 0.0),
    ],
)
def test_arithmetic_reward(response, label, reward):
    assert arithmetic_reward(response, label) == reward


def test_parse_tells_malformed_apart():
    assert parse_arithmetic_answer("1+1=2") == 2
    assert parse_arithmetic_answer("1+1=") is None
    assert parse_arithmetic_answer("hello") is None


def test_unknown_reward():
    with pytest.raises(ValueError, match="unknown reward 'nope'.*arithmetic"):
        get_reward_fn("nope")


def test_load_prompts(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps({"prompt": "1+2", "label": 3}) + "\n\n" + json.dumps({"prompt": "2+2", "label": "4"}) + "\n"
    )
    rows = load_prompts(p)
    assert [(r.prompt, r.label, r.index) for r in rows] == [("1+2", "3", 0), ("2+2", "4", 1)]


@pytest.mark.parametrize(
    "line,msg",
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "1+1"}', "missing field 'label'"),
        ('["1+1", 2]', "expected a JSON object"),
        ('{"prompt": "", "label": 1}', "non-empty string"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "1+2", "label": 3}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{msg}"):
        load_prompts(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
