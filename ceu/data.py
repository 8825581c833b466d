"""Unlearning data: TOFU-format QA (``question``, ``answer``, optional ``paraphrased_answer``, ``perturbed_answer``)
and MUSE-style raw text, loaded with ``datasets`` and tokenised into ``{"input_ids", "labels"}`` samples whose
prompt tokens are labelled ``IGNORE_INDEX`` so only the answer (or the text) counts.

Sources are a local ``.json``/``.jsonl`` file, a local folder holding ``<split>.json`` (TOFU's own layout), or a
hub dataset name with a config, e.g. ``load_records("locuslab/TOFU", "forget10")``.
"""
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
QA_FIELDS = ("question", "answer")
JSON_HINT = "Is it valid JSON or JSON Lines (one object per line)?"
NO_FIELDS = "no record has a field (every object is {})"


def load_records(source: str, config: str | None = None, split: str = "train"):
    """A ``datasets.Dataset`` from a local JSON/JSONL file, a folder with ``<config>.json(l)``, or the hub.

    A corrupt local file raises ``ValueError`` naming it and, where found, the bad line or position.
    """
    import datasets

    path = _local_file(source, config)
    if path is not None:
        # Read with the stdlib first: pyarrow's reader crashes the interpreter on a leading null and silently turns
        # a list of lists into one "text" column; the stdlib also says where a file is broken.
        if problem := _json_problem(path):
            raise ValueError(f"{path}: {problem}. {JSON_HINT}")
        try:  # what is left for datasets to refuse, e.g. a duplicated key (pyarrow's parse error)
            records = datasets.load_dataset("json", data_files=str(path), split="train")
        except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as error:
            raise ValueError(f"{path}: datasets could not read it ({error.__cause__ or error!r}). {JSON_HINT}") \
                from error
    else:
        records = datasets.load_dataset(source, config, split=split)
    if len(records) == 0:
        raise ValueError(f"{records_name(source, config, split)} is empty")
    return records


def records_name(source: str, config: str | None = None, split: str = "train") -> str:
    """What errors call the records :func:`load_records` gives for the same arguments: the local file, or the hub
    dataset with its config and split. Pass it as ``where`` to :func:`tokenize_qa` and :func:`tokenize_text`."""
    path = _local_file(source, config)
    return str(path) if path is not None else f"{source} [{config}/{split}]"


def _local_file(source: str, config: str | None) -> Path | None:
    """The local JSON/JSONL file named by ``source`` (a file, or a folder holding ``<config>.json(l)``), or None for
    a hub dataset."""
    path = Path(source)
    if path.is_dir():
        if config is None:
            raise ValueError(f"{source} is a folder: name the split file to read (e.g. config='forget10')")
        found = [path / f"{config}{suffix}" for suffix in (".json", ".jsonl") if (path / f"{config}{suffix}").is_file()]
        if not found:
            raise FileNotFoundError(f"no {config}.json or {config}.jsonl in {source}")
        return found[0]
    if path.is_file():
        return path
    if path.suffix in (".json", ".jsonl"):
        raise FileNotFoundError(f"no such data file: {source}")
    return None


def _json_problem(path: Path) -> str | None:
    """What the stdlib ``json`` module finds wrong with the file, and where: ``datasets``' own errors rarely say."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return f"not UTF-8 text at line {line} (byte {error.start}: {error.reason})"
    if not text.strip():
        return "the file is empty"
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one value then more: JSON Lines, checked line by line
            return _json_lines_problem(text)
        return f"invalid JSON: {error}"
    if isinstance(records, dict):
        return None
    if not isinstance(records, list):
        return f"the top level is {json.dumps(records)[:40]}, not a list of objects"
    if not records:
        return "no records (an empty list)"
    for index, record in enumerate(records):  # counted from 0, as record errors after loading are
        if not isinstance(record, dict):
            return f"record {index} is {json.dumps(record)[:40]}, not an object"
    return None if any(records) else NO_FIELDS


def _json_lines_problem(text: str) -> str | None:
    """The first line of a JSON Lines text that is not a JSON object (split on newlines only, as JSON Lines is)."""
    any_field = False
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                return f"invalid JSON: {error.msg}: line {number} column {error.colno}"
            if not isinstance(record, dict):
                return f"line {number} is {json.dumps(record)[:40]}, not an object"
            any_field = any_field or bool(record)
    return None if any_field else NO_FIELDS


def check_fields(records, fields: Iterable[str], where: str = "dataset",
                 blank_ok: Iterable[str] = ("question",)) -> None:
    """Every record has every field as a string, not blank unless the field is in ``blank_ok`` (a blank answer
    would train on the end-of-sequence token alone): a ``ValueError`` names ``where`` (the file or split), the
    record's index (from 0) and the field, and says what was found (``datasets`` reads a missing field as null)."""
    if len(records) == 0:
        raise ValueError(f"{where} is empty")
    columns = getattr(records, "column_names", None)
    for index, record in enumerate(records if columns is None else ()):
        if not isinstance(record, Mapping):
            raise ValueError(f"{where} record {index} is {_describe(record)}, not an object with fields {fields}")
    for field in fields:
        if columns is not None and field not in columns:
            raise ValueError(f"{where} has no {field!r} field (fields: {', '.join(columns)})")
        values = records[field] if columns is not None else [record.get(field, _MISSING) for record in records]
        for index, value in enumerate(values):
            if value is _MISSING:
                raise ValueError(f"{where} record {index} has no {field!r} field "
                                 f"(fields: {', '.join(records[index])})")
            if value is None:
                raise ValueError(f"{where} record {index}: {field!r} is missing or null; it must be a string")
            if not isinstance(value, str):
                raise ValueError(f"{where} record {index}: {field!r} must be a string, got {_describe(value)}")
            if not value.strip() and field not in blank_ok:
                raise ValueError(f"{where} record {index}: {field!r} is blank ({value!r})")


_MISSING = object()


def _describe(value) -> str:
    """A found value for an error message: its JSON type and the start of its JSON text."""
    kind = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    return f"{kind} {json.dumps(value, default=str)[:40]}"


def check_max_length(max_length, allow_none: bool = True) -> None:
    """``max_length`` is an int of at least 2 (one token to read, one to predict), or None (no truncation) where
    allowed: 0 or less would slice samples to nothing, or silently from the end."""
    if max_length is None and allow_none:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        allowed = "an int >= 2 (a token to read and one to predict)" + (" or None" if allow_none else "")
        raise ValueError(f"max_length must be {allowed}, got {max_length!r}")


@dataclass(frozen=True)
class QATemplate:
    """How a question becomes the prompt; the answer follows it directly, then EOS.

    ``prompt`` is a format string with ``{question}``. ``chat=True`` uses the tokenizer's chat template instead (a user
    turn and the generation prompt), as instruction-tuned models expect. ``system_prompt`` (chat only): None keeps the
    template's own system turn (many inject a default one into every sample), a text replaces it, ``""`` drops it.
    """

    prompt: str = "Question: {question}\nAnswer: "
    chat: bool = False
    system_prompt: str | None = None

    def __post_init__(self):
        if self.system_prompt is not None and not self.chat:
            raise ValueError("system_prompt applies to the chat template: set chat=True (--chat-template)")


def bos_prefix(tokenizer) -> list[int]:
    """``[BOS]`` for a prompt or text encoded without the tokenizer's special tokens, or ``[]``: none when the
    tokenizer has no BOS or its BOS is a chat-turn marker (it appears in the chat template, as SmolLM2's
    ``<|im_start|>`` does), which opens a turn rather than a document."""
    bos = getattr(tokenizer, "bos_token", None)
    if tokenizer.bos_token_id is None or (bos and bos in (getattr(tokenizer, "chat_template", None) or "")):
        return []
    return [tokenizer.bos_token_id]


def chat_prompt_ids(tokenizer, question: str, system_prompt: str | None = None) -> list[int]:
    """The chat template's turns before the answer: system (see :class:`QATemplate`), user, generation prompt.
    Dropping the system turn cuts the system turn rendered alone from the front, so the template must render it as a
    prefix (``ValueError`` otherwise)."""
    user = [{"role": "user", "content": question}]
    if system_prompt is None:
        return list(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    system = [{"role": "system", "content": system_prompt}]
    text = tokenizer.apply_chat_template(system + user, add_generation_prompt=True, tokenize=False)
    if not system_prompt:
        turn = tokenizer.apply_chat_template(system, tokenize=False)
        if not text.startswith(turn):
            raise ValueError("this chat template does not render the system turn as a prefix of the conversation, so "
                             "it cannot be dropped: give a system prompt instead of an empty one")
        bos = tokenizer.decode(bos_prefix(tokenizer))
        text = (bos if bos and turn.startswith(bos) else "") + text[len(turn):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_qa(tokenizer, question: str, answer: str, template: QATemplate = QATemplate(),
              max_length: int | None = None) -> dict:
    """``input_ids = [BOS] prompt answer [EOS]`` with the prompt (and BOS) labelled ``IGNORE_INDEX``.

    Prompt and answer are tokenised separately so the boundary is exact. Truncation cuts from the right; a sample with
    no answer token left raises ``ValueError``.
    """
    check_max_length(max_length)
    if template.chat:
        prompt_ids = chat_prompt_ids(tokenizer, question, template.system_prompt)
    else:
        prompt_ids = bos_prefix(tokenizer) + tokenizer(template.prompt.format(question=question),
                                                       add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    input_ids = (list(prompt_ids) + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"no answer token left after truncation to max_length={max_length} "
                         f"(prompt is {len(prompt_ids)} tokens): {question[:60]!r}")
    return {"input_ids": input_ids, "labels": labels}


def tokenize_qa(records, tokenizer, template: QATemplate = QATemplate(), max_length: int | None = 512,
                answer_field: str = "answer", where: str = "dataset") -> list[dict]:
    """Tokenise every QA record (see :func:`encode_qa`); errors name ``where`` and the record's index."""
    check_max_length(max_length)
    check_fields(records, ("question", answer_field), where)
    samples = []
    for index, record in enumerate(records):
        try:
            samples.append(encode_qa(tokenizer, record["question"], record[answer_field], template, max_length))
        except ValueError as error:
            raise ValueError(f"{where} record {index}: {error}") from None
    return samples


def tokenize_text(records, tokenizer, max_length: int = 2048, text_field: str = "text",
                  where: str = "dataset") -> list[dict]:
    """MUSE-style raw text: each document cut into ``max_length``-token chunks in which every token counts."""
    check_max_length(max_length, allow_none=False)
    check_fields(records, (text_field,), where)
    samples = []
    for index, record in enumerate(records):
        ids = bos_prefix(tokenizer) + tokenizer(record[text_field], add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise ValueError(f"{where} record {index}: {text_field!r} has no token to predict")
        for start in range(0, len(ids) - 1, max_length):
            chunk = ids[start:start + max_length]
            if len(chunk) > 1:
                samples.append({"input_ids": chunk, "labels": list(chunk)})
    return samples


def pad_batch(samples: list[Mapping], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    length = max(len(sample["input_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        size = len(sample["input_ids"])
        input_ids[row, :size] = torch.tensor(sample["input_ids"])
        labels[row, :size] = torch.tensor(sample["labels"])
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def answer_token_counts(samples: list[dict], shifted: bool = True) -> list[int]:
    """Answer tokens per sample that a loss counts: those of ``labels[1:]`` for next-token prediction."""
    return [sum(label != IGNORE_INDEX for label in sample["labels"][1 if shifted else 0:]) for sample in samples]


def check_not_empty(forget_data: list[dict], retain_data: list[dict]) -> None:
    if not forget_data or not retain_data:
        empty = "forget set is empty: nothing to unlearn" if not forget_data else "retain set is empty: no constraint"
        raise ValueError(f"need forget and retain samples, got {len(forget_data)} and {len(retain_data)}: the {empty}")


def check_answer_tokens(forget_data: list[dict], retain_data: list[dict], forget_shifted: bool = True) -> None:
    """The guard both training loops run first: refuse empty sets, and samples with no answer token for the loss to
    count (a micro-batch of them would train on a silent 0 or NaN), typically answers ``max_length`` truncated away.
    ``forget_shifted``: the forget loss counts ``labels[1:]`` (``False``: the reference's unshifted mask)."""
    check_not_empty(forget_data, retain_data)
    for name, samples, shifted in (("forget", forget_data, forget_shifted), ("retain", retain_data, True)):
        empty = [index for index, count in enumerate(answer_token_counts(samples, shifted)) if count == 0]
        if empty:
            raise ValueError(f"{name} samples {empty[:8]}{' ...' if len(empty) > 8 else ''} have no answer token: "
                             "their answers are truncated or masked; raise max_length or drop them")
