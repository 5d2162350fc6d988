"""Prompt data: JSONL, Parquet and `datasets` directories, custom keys, chat-message prompts, the chat template
(on: the checkpoint's template; off: text verbatim), metadata reaching the reward function, and bad rows named
by file and line / row."""

from __future__ import annotations

import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glm_rl.rollout.data import DataError, load_prompts, prompt_ids
from glm_rl.rollout.rewards import RewardRequest, build_rewarder

CHAT = [{"role": "system", "content": "0"}, {"role": "user", "content": "12+30"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# -- Parquet ---------------------------------------------------------------------------------------------------
def test_parquet_with_custom_keys_chat_prompts_and_metadata(tmp_path, tokenizer):
    p = write_parquet(
        tmp_path / "train.parquet",
        [
            {"question": CHAT, "answer": "42", "metadata": {"source": "synthetic", "level": 1}},
            {"question": [{"role": "user", "content": "5+5"}], "answer": "10", "metadata": {"source": "x", "level": 2}},
        ],
    )
    rows = load_prompts(p, "question", "answer", metadata_key="metadata")
    assert [r.prompt for r in rows] == [CHAT, [{"role": "user", "content": "5+5"}]]
    assert [(r.label, r.index, r.metadata) for r in rows] == [
        ("42", 0, {"source": "synthetic", "level": 1}),
        ("10", 1, {"source": "x", "level": 2}),
    ]
    ids = prompt_ids(tokenizer, rows[0].prompt)
    assert ids == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.decode(ids).startswith("[gMASK]<sop><|system|>\n0<|user|>\n12+30<|assistant|>")


def test_parquet_nested_label_key_and_null_message_fields(tmp_path):
    """DAPO-Math-17k keeps its answer at reward_model.ground_truth; Parquet gives absent message fields as null."""
    p = write_parquet(
        tmp_path / "dapo.parquet",
        [
            {"prompt": [{"role": "user", "content": "1+1", "name": None}], "reward_model": {"ground_truth": "2"}},
            {"prompt": [{"role": "user", "content": "2+2", "name": "bob"}], "reward_model": {"ground_truth": "4"}},
        ],
    )
    rows = load_prompts(p, label_key="reward_model.ground_truth")
    assert [r.label for r in rows] == ["2", "4"]
    assert rows[0].prompt == [{"role": "user", "content": "1+1"}] and rows[1].prompt[0]["name"] == "bob"
    assert rows[0].metadata == {} and rows[0].tools is None


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"question": [], "answer": "1"}, "empty list of chat messages"),
        ({"question": [{"content": "hi"}], "answer": "1"}, r"question\[0\] must be a chat message"),
        ({"question": None, "answer": "1"}, "must be a non-empty string or a list of chat messages, got NoneType"),
        ({"question": [{"role": "user", "content": "1"}], "answer": None}, "field 'answer' is null"),
    ],
)
def test_parquet_bad_row_names_file_and_row(tmp_path, bad, msg):
    good = {"question": [{"role": "user", "content": "1+1"}], "answer": "2"}
    p = write_parquet(tmp_path / "bad.parquet", [good, good, bad])
    with pytest.raises(DataError, match=rf"bad.parquet: row 2: .*{msg}"):
        load_prompts(p, "question", "answer")


def test_unreadable_parquet_names_the_file(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        load_prompts(tmp_path / "junk.parquet")


# -- datasets directories --------------------------------------------------------------------------------------
def test_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list(
        [
            {"prompt": "1+2", "label": "3", "metadata": json.dumps({"id": 7})},
            {"prompt": "2+2", "label": "4", "metadata": json.dumps({"id": 8})},
        ]
    ).save_to_disk(str(tmp_path / "ds"))
    rows = load_prompts(tmp_path / "ds")
    assert [(r.prompt, r.label, r.metadata) for r in rows] == [("1+2", "3", {"id": 7}), ("2+2", "4", {"id": 8})]


def test_datasets_dict_needs_a_split_and_names_bad_rows(tmp_path):
    import datasets

    good = datasets.Dataset.from_list([{"prompt": "1+2", "label": "3"}])
    bad = datasets.Dataset.from_list([{"prompt": "1+2", "label": "3"}, {"prompt": "", "label": "4"}])
    datasets.DatasetDict({"train": bad, "test": good}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: choose a split with split=… \(has: train, test\)"):
        load_prompts(tmp_path / "dd")
    assert [r.label for r in load_prompts(tmp_path / "dd", split="test")] == ["3"]
    with pytest.raises(DataError, match=r"dd \(split train\): row 1: field 'prompt' must be a non-empty string"):
        load_prompts(tmp_path / "dd", split="train")


def test_plain_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="not one saved by datasets' save_to_disk"):
        load_prompts(tmp_path / "d")


# -- JSONL -----------------------------------------------------------------------------------------------------
def test_jsonl_metadata_tools_and_labels(tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "1+2", "label": 3, "metadata": {"split": "a"}, "tools": json.dumps(tools)},
            {"prompt": CHAT, "label": ["x", "y"], "tools": tools},
            {"prompt": "2+2", "label": 4.5, "metadata": None},
        ],
    )
    rows = load_prompts(p)
    assert [(r.label, r.metadata, r.tools) for r in rows] == [
        ("3", {"split": "a"}, tools),
        ('["x", "y"]', {}, tools),
        ("4.5", {}, None),
    ]


@pytest.mark.parametrize(
    "line,msg",
    [
        ('{"prompt": "1+1", "label": 2, "metadata": "{oops"}', "field 'metadata' is a string but not JSON"),
        ('{"prompt": "1+1", "label": 2, "metadata": [1, 2]}', "field 'metadata' must be a JSON object, got list"),
        ('{"prompt": "1+1", "label": 2, "tools": {"name": "f"}}', "field 'tools' must be a list, got dict"),
        ('{"prompt": [{"role": "user", "content": 5}], "label": 2}', r"prompt\[0\].content must be a string, got int"),
        ('{"prompt": 12, "label": 2}', "field 'prompt' must be a non-empty string or a list of chat messages, got int"),
    ],
)
def test_jsonl_bad_row_names_file_and_line(tmp_path, line, msg):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+2", "label": 3}, "", line])
    with pytest.raises(DataError, match=rf"bad.jsonl:3: {msg}"):
        load_prompts(p)


# -- the chat template switch ----------------------------------------------------------------------------------
def test_default_is_todays_template_for_text_prompts(tokenizer):
    """Text prompts go through the checkpoint's template as one user turn, as before (the tiny demo relies on it)."""
    from glm_rl.evaluate import chat_prompt_ids

    assert prompt_ids(tokenizer, "123+456") == chat_prompt_ids(tokenizer, "123+456")


def test_without_the_template_text_is_verbatim_and_chat_rows_are_refused(tmp_path, tokenizer):
    rendered = "[gMASK]<sop><|user|>\n1+2<|assistant|>\n"
    assert prompt_ids(tokenizer, rendered, apply_chat_template=False) == tokenizer.encode(
        rendered, add_special_tokens=False
    )
    assert prompt_ids(tokenizer, rendered, apply_chat_template=False) == prompt_ids(tokenizer, "1+2")
    p = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "1+2", "label": 3}, {"prompt": CHAT, "label": 42}])
    with pytest.raises(DataError, match=r"chat.jsonl:2: field 'prompt' is a list of chat messages; .*chat template"):
        load_prompts(p, apply_chat_template=False)
    with pytest.raises(DataError, match="need the chat template"):
        prompt_ids(tokenizer, CHAT, apply_chat_template=False)


def test_tiny_demo_data_still_loads():
    from glm_rl.models.glm45.presets import TINY_CHECKPOINT

    rows = load_prompts(TINY_CHECKPOINT.parent / "arith" / "train.jsonl")
    assert rows and all(isinstance(r.prompt, str) and r.metadata == {} for r in rows)


def test_metadata_reaches_the_reward_function(tmp_path, monkeypatch):
    (tmp_path / "meta_rm.py").write_text(
        "def by_unit(response, label, metadata):\n    return float(response == label + metadata['unit'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = load_prompts(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "how far", "label": 3, "metadata": {"unit": "km"}}])
    )
    rewarder = build_rewarder(custom_rm_path="meta_rm.by_unit")
    row = rows[0]
    requests = [RewardRequest(r, row.label, row.metadata, row.prompt, f"s0-{i}") for i, r in enumerate(["3km", "3"])]
    assert asyncio.run(rewarder.score_group(requests)) == [1.0, 0.0]
