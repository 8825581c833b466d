"""ceu.data: TOFU-format loading from local files, QA templating with the prompt masked, raw text, clear errors."""
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ceu.data import (IGNORE_INDEX, QATemplate, check_max_length, encode_qa, load_records, pad_batch, records_name,
                      tokenize_qa, tokenize_text)

TOFU_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tofu_legacy"  # TOFU's own files, see its README


class WordTokenizer:
    """The slice of the Hugging Face tokenizer interface that ceu.data uses: ids are word lengths + 10."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [10 + len(word) for word in text.split()]}


TOKENIZER = WordTokenizer()
TEMPLATE = QATemplate(prompt="Q: {question} A:")


def test_encode_qa_masks_bos_and_prompt():
    sample = encode_qa(TOKENIZER, "who is it ?", "an author", TEMPLATE)
    prompt = [1, 12, 13, 12, 12, 11, 12]  # BOS, "Q:", "who", "is", "it", "?", "A:"
    assert sample["input_ids"] == prompt + [12, 16, 2]
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + [12, 16, 2]


def test_encode_qa_truncates_from_the_right_and_rejects_answerless_samples():
    assert encode_qa(TOKENIZER, "q", "a b c", TEMPLATE, max_length=5)["labels"] == [IGNORE_INDEX] * 4 + [11]
    with pytest.raises(ValueError, match="no answer token left after truncation to max_length=4"):
        encode_qa(TOKENIZER, "q", "a b c", TEMPLATE, max_length=4)


def test_tokenize_qa_names_the_sample_and_the_missing_field():
    records = [{"question": "q", "answer": "a"}, {"question": "q"}]
    with pytest.raises(ValueError, match=r"forget record 1 has no 'answer' field \(fields: question\)"):
        tokenize_qa(records, TOKENIZER, TEMPLATE, where="forget")
    with pytest.raises(ValueError, match="forget is empty"):
        tokenize_qa([], TOKENIZER, TEMPLATE, where="forget")
    with pytest.raises(ValueError, match="forget record 0: no answer token left"):
        tokenize_qa(records[:1], TOKENIZER, TEMPLATE, max_length=2, where="forget")


def test_tokenize_qa_other_answer_field():
    [sample] = tokenize_qa([{"question": "q", "answer": "a", "paraphrased_answer": "b c"}], TOKENIZER, TEMPLATE,
                           answer_field="paraphrased_answer")
    assert sample["labels"][-3:] == [11, 11, 2]


def test_tokenize_text_chunks_every_token_counted():
    samples = tokenize_text([{"text": "a b c d e"}], TOKENIZER, max_length=4)
    assert [s["input_ids"] for s in samples] == [[1, 11, 11, 11], [11, 11]]
    assert all(s["labels"] == s["input_ids"] for s in samples)
    with pytest.raises(ValueError, match="no 'text' field"):
        tokenize_text([{"body": "a"}], TOKENIZER)


def test_pad_batch_right_pads():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_load_records_from_json_lines_and_json_array(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    (tmp_path / "forget10.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (tmp_path / "array.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path), "forget10")["answer"] == ["a1", "a2"]
    assert load_records(str(tmp_path / "array.json"))["question"] == ["q1", "q2"]


def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_records(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="no forget05.json or forget05.jsonl"):
        load_records(str(tmp_path), "forget05")
    with pytest.raises(ValueError, match="name the split file"):
        load_records(str(tmp_path))


ROWS = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(1, 5)]


@pytest.mark.parametrize("name, content, problem", [
    ("truncated.json", json.dumps(ROWS)[:53], "invalid JSON: Unterminated string starting at: line 1 column 51 (char 50)"),
    ("broken_line.jsonl", "\n".join([*map(json.dumps, ROWS[:2]), '{"question": "q3", "answer": ', json.dumps(ROWS[3])]),
     "invalid JSON: Expecting value: line 3 column 30"),
    ("garbage.json", b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text at line 1 (byte 0: invalid start byte)"),
    ("latin1.jsonl", json.dumps(ROWS[0]).encode() + b'\n\xff' + json.dumps(ROWS[1]).encode(),
     "not UTF-8 text at line 2 (byte 35: invalid start byte)"),
    ("scalar.json", "42", "the top level is 42, not a list of objects"),
    ("mixed.json", json.dumps([ROWS[0], "q2"]), 'record 1 is "q2", not an object'),
    ("no_fields.json", "[{}, {}]", "no record has a field (every object is {})"),
    ("no_fields.jsonl", "{}\n{}\n", "no record has a field (every object is {})"),
    ("lists.jsonl", json.dumps(ROWS[0]) + "\n[1, 2]\n", "line 2 is [1, 2], not an object"),
    ("empty.json", "", "the file is empty"),
    ("empty_list.json", "[]", "no records"),
    ("duplicate_key.jsonl", '{"answer": "a1", "answer": "a2"}', "datasets could not read it (ArrowInvalid("),
])
def test_load_records_names_the_corrupt_file_and_where(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match="Is it valid JSON or JSON Lines") as caught:
        load_records(str(path))
    assert str(caught.value).startswith(f"{path}: {problem}")
    # the stdlib's reading finds every problem but the last before datasets runs; that one is datasets' own error
    assert (caught.value.__cause__ is not None) == name.startswith("duplicate_key")


def test_load_records_names_the_corrupt_split_file_in_a_folder(tmp_path):
    lines = "\n".join(map(json.dumps, ROWS))
    (tmp_path / "forget05.json").write_text(lines)
    (tmp_path / "forget10.json").write_text(lines.replace('"a3"', '"a3'))
    assert load_records(str(tmp_path), "forget05")["answer"] == ["a1", "a2", "a3", "a4"]
    with pytest.raises(ValueError) as caught:
        load_records(str(tmp_path), "forget10")
    assert str(caught.value).startswith(f"{tmp_path / 'forget10.json'}: invalid JSON: Unterminated string starting at: "
                                        "line 3 column 30.")


@pytest.mark.parametrize("content, problem", [("null", "the top level is null, not a list of objects"),
                                              ('  null\n{"a": 1}', "line 1 is null, not an object")])
def test_a_file_that_starts_with_null_is_refused_before_pyarrow_crashes_on_it(tmp_path, content, problem):
    path = tmp_path / "null.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError) as caught:  # pyarrow's reader ends the process with a segfault on this file
        load_records(str(path))
    assert str(caught.value) == f"{path}: {problem}. Is it valid JSON or JSON Lines (one object per line)?"


@pytest.mark.parametrize("name, rows, first_question, first_answer", [
    ("world_facts_perturbed.json", 117, "Where would you find the Eiffel Tower?", "Paris"),
    ("real_authors_perturbed.json", 100, "Who wrote the play 'Romeo and Juliet'?", "William Shakespeare"),
])
def test_load_records_reads_tofus_own_files(name, rows, first_question, first_answer):
    """TOFU's held eval sets, as TOFU ships them (JSON lines named .json, three perturbed answers each)."""
    records = load_records(str(TOFU_FIXTURES / name))
    assert len(records) == rows
    assert records[0]["question"] == first_question and records[0]["answer"] == first_answer
    assert all(len(perturbed) == 3 for perturbed in records["perturbed_answer"])
    samples = tokenize_qa(records, TOKENIZER, TEMPLATE, where=name)
    assert len(samples) == rows
    # the last sample's labels are its answer's tokens (+ EOS), its question's are masked
    answer = [10 + len(word) for word in records[rows - 1]["answer"].split()] + [TOKENIZER.eos_token_id]
    assert samples[-1]["labels"][-len(answer):] == answer
    assert samples[-1]["labels"][:-len(answer)] == [IGNORE_INDEX] * (len(samples[-1]["labels"]) - len(answer))


# --- Malformed records and lengths: an error naming where, the record and the field, before any tokenising ---------

class StrictTokenizer(WordTokenizer):
    """WordTokenizer that fails the test if it is called on anything but a string (a real tokenizer would raise a
    type error of its own, or batch-encode a list silently)."""

    def __call__(self, text, add_special_tokens=True):
        assert isinstance(text, str), f"the tokenizer was called on {text!r}"
        return super().__call__(text, add_special_tokens)


JSON_NON_STRINGS = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False),
                                lambda inner: st.lists(inner, max_size=3)
                                | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=5)


@settings(max_examples=60, deadline=None)
@given(bad=JSON_NON_STRINGS, field=st.sampled_from(["question", "answer"]), index=st.integers(0, 3))
def test_tokenize_qa_refuses_a_non_string_field_naming_record_and_field(bad, field, index):
    records = [dict(row) for row in ROWS]
    records[index][field] = bad
    with pytest.raises(ValueError) as caught:
        tokenize_qa(records, StrictTokenizer(), TEMPLATE, where="forget10.json")
    if bad is None:
        assert str(caught.value) == f"forget10.json record {index}: {field!r} is missing or null; it must be a string"
    else:
        assert str(caught.value).startswith(f"forget10.json record {index}: {field!r} must be a string, got a")


@settings(max_examples=30, deadline=None)
@given(bad=JSON_NON_STRINGS, index=st.integers(0, 2))
def test_tokenize_text_refuses_a_non_string_text(bad, index):
    records = [{"text": "a b c"} for _ in range(3)]
    records[index]["text"] = bad
    with pytest.raises(ValueError, match=rf"^muse record {index}: 'text' (must be a string, got a|is missing or null)"):
        tokenize_text(records, StrictTokenizer(), max_length=4, where="muse")


@pytest.mark.parametrize("field, value", [("answer", ""), ("answer", " \n"), ("text", "  ")])
def test_blank_answers_and_texts_are_refused(field, value):
    """A blank answer trained on EOS alone; a blank question is allowed (the prompt still has its template)."""
    records = [{"question": "q", "answer": "a", "text": "a b"}, {"question": "", "answer": "a", "text": "a b"}]
    records[1][field] = value
    with pytest.raises(ValueError, match=f"^split record 1: '{field}' is blank"):
        if field == "text":
            tokenize_text(records, StrictTokenizer(), max_length=4, where="split")
        else:
            tokenize_qa(records, StrictTokenizer(), TEMPLATE, where="split")


@pytest.mark.parametrize("records, message", [
    ([{"question": "q", "answer": "a"}, ["q", "a"]], r"forget record 1 is a list \["),
    ([[{"question": "q", "answer": "a"}]], r"forget record 0 is a list \[\{"),
    ([{"question": "q", "answer": "a"}, "q a"], r"forget record 1 is a string \"q a\""),
    ([{"answer": "a"}], r"forget record 0 has no 'question' field \(fields: answer\)"),
])
def test_tokenize_qa_refuses_records_that_are_not_objects(records, message):
    with pytest.raises(ValueError, match=message):
        tokenize_qa(records, StrictTokenizer(), TEMPLATE, where="forget")


@pytest.mark.parametrize("name, rows, message", [
    ("null.jsonl", [ROWS[0], {"question": "q2", "answer": None}],
     "record 1: 'answer' is missing or null; it must be a string"),
    ("missing.jsonl", [ROWS[0], {"question": "q2"}], "record 1: 'answer' is missing or null; it must be a string"),
    ("numbers.jsonl", [{"question": "q1", "answer": 4}, {"question": "q2", "answer": 5}],
     "record 0: 'answer' must be a string, got a number 4"),
    ("mixed.jsonl", [ROWS[0], {"question": "q2", "answer": 5}], "record 1: 'answer' must be a string, got a number 5"),
    ("list.jsonl", [ROWS[0], {"question": "q2", "answer": ["a", "b"]}],
     'record 1: \'answer\' must be a string, got a list ["a", "b"]'),
    ("lists.jsonl", [{"question": "q1", "answer": [["a"]]}],
     'record 0: \'answer\' must be a string, got a list [["a"]]'),
    ("question.json", [{"question": 7.5, "answer": "a"}], "record 0: 'question' must be a string, got a number 7.5"),
    ("boolean.jsonl", [{"question": "q", "answer": True}], "record 0: 'answer' must be a string, got a boolean true"),
])
def test_malformed_records_in_a_file_are_refused_by_file_record_and_field(tmp_path, name, rows, message):
    """Through datasets (which reads a missing field as null, a numeric column as int64): the file loads, and
    tokenising it names the file, the record and the field, never a tokenizer's type error."""
    path = tmp_path / name
    path.write_text("\n".join(map(json.dumps, rows)) if name.endswith("l") else json.dumps(rows))
    split = path.stem
    with pytest.raises(ValueError) as caught:
        tokenize_qa(load_records(str(tmp_path), split), StrictTokenizer(), TEMPLATE,
                    where=records_name(str(tmp_path), split))
    assert str(caught.value) == f"{path} {message}"
    assert records_name("locuslab/TOFU", "forget10") == "locuslab/TOFU [forget10/train]"


def test_a_list_of_lists_file_is_refused_not_read_as_a_text_column(tmp_path):
    """datasets reads [[{...}]] as one record with a "text" column holding the object: refused before it."""
    path = tmp_path / "nested.json"
    path.write_text(json.dumps([ROWS]))
    with pytest.raises(ValueError, match=r"record 0 is \[\{.*not an object"):
        load_records(str(path))


@pytest.mark.parametrize("max_length", [0, 1, -1, -5, 2.0, "512", True])
def test_max_length_below_two_or_not_an_int_is_refused_before_tokenising(max_length):
    """0 gave empty samples, -k cut k tokens from the end silently, 1 left no token to predict; raw-text chunking
    with 0 failed inside range() and with 1 returned no samples."""
    expected = rf"max_length must be an int >= 2 \(a token to read and one to predict\)( or None)?, got {max_length!r}"
    for call in (lambda: tokenize_qa(ROWS, StrictTokenizer(), TEMPLATE, max_length=max_length),
                 lambda: tokenize_text([{"text": "a b c"}], StrictTokenizer(), max_length=max_length),
                 lambda: encode_qa(StrictTokenizer(), "q", "a", TEMPLATE, max_length=max_length)):
        with pytest.raises(ValueError, match=expected):
            call()
    with pytest.raises(ValueError, match="max_length must be an int >= 2 .*, got None"):
        tokenize_text([{"text": "a b c"}], StrictTokenizer(), max_length=None)


@settings(max_examples=40, deadline=None)
@given(max_length=st.integers(2, 12), words=st.integers(1, 20))
def test_text_chunks_predict_every_token_but_chunk_starts(max_length, words):
    """Every chunk has a token to predict and none is longer than max_length; the chunks are the document in order."""
    ids = [TOKENIZER.bos_token_id] + [11] * words
    samples = tokenize_text([{"text": " ".join(["a"] * words)}], TOKENIZER, max_length=max_length)
    assert samples and all(2 <= len(s["input_ids"]) <= max_length for s in samples)
    assert sum((s["input_ids"] for s in samples), []) == ids[:len(sum((s["input_ids"] for s in samples), []))]
    assert len(ids) - sum(len(s["input_ids"]) for s in samples) <= 1  # at most a last lone token, nothing to predict


def test_check_max_length_accepts_none_only_where_allowed():
    check_max_length(None)
    check_max_length(2)
    with pytest.raises(ValueError, match="got None"):
        check_max_length(None, allow_none=False)
