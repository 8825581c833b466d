"""ceu.synthetic: the deterministic fictitious world, its tokenizer, and the cached stage-one models."""
import pytest

from ceu.synthetic import TEMPLATE, TinyLlama, build_tokenizer, make_world, stage_one


def test_world_is_deterministic_with_tofu_splits():
    world = make_world(n_authors=20, seed=3)
    assert world == make_world(n_authors=20, seed=3)
    assert world != make_world(n_authors=20, seed=4)
    assert len(world["full"]) == 20 * 8
    for percent, authors in ((1, 1), (5, 1), (10, 2)):
        forget, retain = world[f"forget{percent:02d}"], world[f"retain{100 - percent}"]
        assert len(forget) == authors * 8 and len(forget) + len(retain) == len(world["full"])
        assert {qa["author"] for qa in forget}.isdisjoint(qa["author"] for qa in retain)
    for qa in world["full"] + world["real_authors"] + world["world_facts"]:
        assert len(qa["perturbed_answer"]) == 3 and qa["answer"] not in qa["perturbed_answer"]
        assert qa["paraphrased_answer"] not in qa["perturbed_answer"]


def test_world_size_is_bounded_by_what_it_can_draw():
    """Beyond 128 authors the book titles run out (the draw would loop for ever); below 2 a retain split is empty."""
    for n_authors in (1, 129):
        with pytest.raises(ValueError, match=f"2 to 128 authors .*got {n_authors}"):
            make_world(n_authors=n_authors)
    for n_authors in (2, 128):
        world = make_world(n_authors=n_authors)
        assert len(world["full"]) == 8 * n_authors and world["retain99"] and world["forget01"]


def test_tokenizer_covers_every_word():
    world = make_world(n_authors=10)
    tokenizer = build_tokenizer(world)
    text = TEMPLATE.prompt.format(question=world["full"][0]["question"]) + " " + world["full"][0]["answer"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_stage_one_trains_once_then_reuses_the_cache(tmp_path):
    pytest.importorskip("transformers")
    messages = []
    shape = TinyLlama(hidden_size=16, intermediate_size=32, num_attention_heads=2)
    stage = stage_one(tmp_path, n_authors=10, shape=shape, epochs=1, progress=False, say=messages.append)
    assert (stage.learned_path / "done").is_file() and (stage.retain_path / "done").is_file()
    again = stage_one(tmp_path, n_authors=10, shape=shape, epochs=1, progress=False, say=messages.append)
    assert [m.startswith("stage one: reusing") for m in messages] == [False, False, True, True]
    assert again.load("learned").config.vocab_size == len(stage.tokenizer)
    assert len(again.samples("forget10")) == 8


def test_export_world_is_a_data_folder_the_cli_reads(tmp_path):
    pytest.importorskip("datasets")
    from ceu.cli import TOFU_EVAL_SPLITS
    from ceu.data import load_records
    from ceu.synthetic import TOFU_FIELDS, export_world

    world = make_world(n_authors=10)
    written = export_world(tmp_path, world)
    assert len(written) == len({path.name for path in written})
    for split, records in world.items():
        assert list(load_records(str(tmp_path), split)) == [{k: r[k] for k in TOFU_FIELDS} for r in records]
    for role, split in TOFU_EVAL_SPLITS.values():  # the eval splits `ceu unlearn --data` looks for
        assert len(load_records(str(tmp_path), split)) > 0
    assert list(load_records(str(tmp_path), "forget10_perturbed")) == list(load_records(str(tmp_path), "forget10"))
    retain_perturbed = {r["question"] for r in load_records(str(tmp_path), "retain_perturbed")}
    assert retain_perturbed.isdisjoint(r["question"] for r in world["forget10"])
