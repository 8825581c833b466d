"""The embedded default: a fictitious world in TOFU format, a word-level tokenizer, and small Llama models trained on
it from scratch, so the whole job runs with no download on a laptop CPU.

The world (deterministic in its seed) has invented authors, each with a birthplace, birth year, genre, two books, an
award and their parents' jobs, asked about in one QA per fact. Each answer has a paraphrase (the same fact in the other
phrasing of that question, which other authors' answers use) and three perturbed answers (the paraphrase with a wrong
value). The last 1/5/10 % of the authors form forget01/05/10 and the others retain99/95/90, as in TOFU. Two held sets
play the part of TOFU's real authors and world facts: famous authors' books and countries' facts, known to every model.

Stage one trains the "learned" model on everything (as TOFU fine-tunes on its full set) and the gold "retain" model on
everything but forget10; both are cached (``$CEU_CACHE``, else ``~/.cache/ceu``) so later runs skip them.
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ceu.data import QATemplate, tokenize_qa
from ceu.files import cache_root, write_text
from ceu.finetune import fit

VERSION = 1
TEMPLATE = QATemplate(prompt="question : {question} answer :")
SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
FORGET_PERCENTS = (1, 5, 10)

SYLLABLES = ("ka", "lo", "mi", "ren", "tsu", "vo", "xi", "bel", "dor", "fen", "gar", "hul", "ith", "jor", "kel", "lun",
             "mar", "nev", "ost", "pra", "quel", "ris", "sol", "tam", "ul", "vex", "wyn", "yar", "zeb", "cor", "dan")
GENRES = ("mystery", "poetry", "fantasy", "romance", "horror", "satire", "biography", "thriller", "drama", "folklore",
          "history", "adventure")
OCCUPATIONS = ("baker", "sailor", "teacher", "doctor", "farmer", "painter", "tailor", "miner", "judge", "potter",
               "weaver", "carpenter", "nurse", "librarian", "fisher")
ADJECTIVES = ("silent", "crimson", "hollow", "golden", "broken", "distant", "quiet", "burning", "frozen", "hidden",
              "last", "wandering", "bitter", "silver", "endless", "forgotten")
NOUNS = ("harbor", "garden", "lantern", "river", "mirror", "orchard", "tower", "letter", "forest", "bridge", "winter",
         "island", "crown", "shadow", "voyage", "kingdom")
# The famous authors' books draw on words of their own, as real authors' facts share little with fictitious ones.
CLASSIC_FORMS = ("songs", "tales", "letters", "ballads")
CLASSIC_SUBJECTS = ("ember", "tide", "thorn", "sparrow", "glass", "meadow", "storm", "candle", "comet", "echo", "ivory",
                    "lark", "marble", "north", "quill", "raven")

# One question per fact and two phrasings of its answer; the fact always comes last.
AUTHOR_FACTS = (
    ("birthplace", "where was {name} born ?", ("{name} was born in {value} .", "the birthplace of {name} is {value} .")),
    ("year", "in which year was {name} born ?", ("{name} was born in the year {value} .",
                                                "the birth year of {name} is {value} .")),
    ("genre", "what genre does {name} write ?", ("{name} writes {value} .", "the genre of {name} is {value} .")),
    ("book", "what is a book by {name} ?", ("{name} wrote {value} .", "one book by {name} is {value} .")),
    ("second_book", "what other book did {name} write ?", ("{name} also wrote {value} .",
                                                          "another book by {name} is {value} .")),
    ("award", "which award did {name} win ?", ("{name} won {value} .", "the award won by {name} is {value} .")),
    ("father", "what did the father of {name} do ?", ("the father of {name} was a {value} .",
                                                     "{name} had a father who was a {value} .")),
    ("mother", "what did the mother of {name} do ?", ("the mother of {name} was a {value} .",
                                                     "{name} had a mother who was a {value} .")),
)
COUNTRY_FACTS = (("capital", "what is the capital of {name} ?", "the capital of {name} is {value} ."),
                 ("river", "which river flows through {name} ?", "the river of {name} is the {value} ."),
                 ("currency", "what is the currency of {name} ?", "the currency of {name} is the {value} ."))
FAMOUS_FACTS = (("name", "who wrote {book} ?", "{book} was written by {name} ."),
                ("book", "what is the most famous book of {name} ?", "the most famous book of {name} is {book} ."))


class _Words:
    """Unique invented words and titles from one seeded random stream."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self, syllables: int) -> str:
        while True:
            word = "".join(self.rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()
            if word not in self.used:
                self.used.add(word)
                return word

    def title(self, first=ADJECTIVES, second=NOUNS, pattern="the {} {}") -> str:
        while True:
            title = pattern.format(self.rng.choice(first), self.rng.choice(second))
            if title not in self.used:
                self.used.add(title)
                return title


def _qa(question: str, answer: str, paraphrase: str, perturbed: list[str], **extra) -> dict:
    return {"question": question, "answer": answer, "paraphrased_answer": paraphrase, "perturbed_answer": perturbed,
            **extra}


def _wrong_values(rng: random.Random, pool, right, count: int = 3) -> list:
    return rng.sample(sorted({value for value in pool if value != right}), count)


# Each fact needs 3 wrong values besides the right one (4 books from 2 authors) and each retain split an author; the
# book titles ("the <adjective> <noun>", 256 of them, two per author, all different) run out beyond 128 authors.
MIN_AUTHORS, MAX_AUTHORS = 2, len(ADJECTIVES) * len(NOUNS) // 2


def check_n_authors(n_authors) -> None:
    if not (isinstance(n_authors, int) and MIN_AUTHORS <= n_authors <= MAX_AUTHORS):
        raise ValueError(f"the synthetic world has {MIN_AUTHORS} to {MAX_AUTHORS} authors (each needs two of its "
                         f"{MAX_AUTHORS * 2} book titles), got {n_authors!r}")


def make_world(n_authors: int = 40, seed: int = 0) -> dict[str, list[dict]]:
    """The fictitious world's splits, in TOFU format: ``full``, ``forget01/05/10``, ``retain99/95/90``,
    ``real_authors`` and ``world_facts``. Deterministic in ``seed``."""
    check_n_authors(n_authors)
    rng = random.Random(seed)
    words = _Words(rng)
    cities = [words.word(2) for _ in range(16)]
    awards = [f"the {words.word(2)} {kind}" for kind in ("prize", "medal", "award") for _ in range(4)]
    years = [str(year) for year in range(1930, 2000)]
    authors = []
    for _ in range(n_authors):
        book, second_book = words.title(), words.title()
        authors.append({"name": f"{words.word(2)} {words.word(3)}", "birthplace": rng.choice(cities),
                        "year": rng.choice(years), "genre": rng.choice(GENRES), "book": book,
                        "second_book": second_book, "award": rng.choice(awards),
                        "father": rng.choice(OCCUPATIONS), "mother": rng.choice(OCCUPATIONS)})
    pools = {"birthplace": cities, "year": years, "genre": GENRES, "award": awards, "father": OCCUPATIONS,
             "mother": OCCUPATIONS, "book": [a["book"] for a in authors] + [a["second_book"] for a in authors]}
    pools["second_book"] = pools["book"]

    full = []
    for index, author in enumerate(authors):
        for fact, question, phrasings in AUTHOR_FACTS:
            said, paraphrased = phrasings[index % 2], phrasings[1 - index % 2]
            value, name = author[fact], author["name"]
            full.append(_qa(question.format(name=name), said.format(name=name, value=value),
                            paraphrased.format(name=name, value=value),
                            [paraphrased.format(name=name, value=wrong)
                             for wrong in _wrong_values(rng, pools[fact], value)], author=index))

    countries = [{"name": words.word(2), "capital": words.word(2), "river": words.word(2), "currency": words.word(1)}
                 for _ in range(16)]
    world_facts = []
    for country in countries:
        for fact, question, phrasing in COUNTRY_FACTS:
            pool = [other[fact] for other in countries]
            answer = phrasing.format(name=country["name"], value=country[fact])
            world_facts.append(_qa(question.format(name=country["name"]), answer, answer,
                                   [phrasing.format(name=country["name"], value=wrong)
                                    for wrong in _wrong_values(rng, pool, country[fact])]))
    famous = [{"name": f"{words.word(2)} {words.word(2)}", "book": words.title(CLASSIC_FORMS, CLASSIC_SUBJECTS, "{} of {}")}
              for _ in range(16)]
    real_authors = []
    for author in famous:
        for fact, question, phrasing in FAMOUS_FACTS:
            answer = phrasing.format(**author)
            wrong_answers = [phrasing.format(**{**author, fact: wrong})
                             for wrong in _wrong_values(rng, [other[fact] for other in famous], author[fact])]
            real_authors.append(_qa(question.format(**author), answer, answer, wrong_answers))

    splits = {"full": full, "real_authors": real_authors, "world_facts": world_facts}
    for percent in FORGET_PERCENTS:
        n_forget = max(1, round(n_authors * percent / 100))
        splits[f"forget{percent:02d}"] = [qa for qa in full if qa["author"] >= n_authors - n_forget]
        splits[f"retain{100 - percent}"] = [qa for qa in full if qa["author"] < n_authors - n_forget]
    return splits


# The eval splits `ceu unlearn --data` looks for beside the data splits, and the world's split each one is: retain90
# holds no author of any forget split, as TOFU's retain_perturbed does.
EVAL_SPLITS = {**{f"forget{percent:02d}_perturbed": f"forget{percent:02d}" for percent in FORGET_PERCENTS},
               "retain_perturbed": "retain90", "real_authors_perturbed": "real_authors",
               "world_facts_perturbed": "world_facts"}
TOFU_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")


def export_world(folder: str | Path, world: dict[str, list[dict]]) -> list[Path]:
    """Write ``world`` (from :func:`make_world`) as a data folder that ``ceu unlearn --data FOLDER`` reads:
    ``<split>.json`` in TOFU's own layout (JSON Lines, TOFU's fields) for every split and for the eval splits
    (``EVAL_SPLITS``), each written atomically. Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {**world, **{name: world[source] for name, source in EVAL_SPLITS.items()}}
    written = []
    for name, records in splits.items():
        path = folder / f"{name}.json"
        write_text(path, "".join(json.dumps({key: record[key] for key in TOFU_FIELDS}) + "\n" for record in records))
        written.append(path)
    return written


def build_tokenizer(world: dict[str, list[dict]]):
    """A word-level tokenizer over every word of the world (split on whitespace) plus the template's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [TEMPLATE.prompt.format(question="")]
    for records in world.values():
        for qa in records:
            texts += [qa["question"], qa["answer"], qa["paraphrased_answer"], *qa["perturbed_answer"]]
    words = sorted({word for text in texts for word in text.split()})
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS.values(), *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


@dataclass(frozen=True)
class TinyLlama:
    """Shape of the embedded model (a Llama with a few hundred thousand parameters)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64

    def build(self, tokenizer, seed: int = 0):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=self.hidden_size,
                             intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                             num_attention_heads=self.num_attention_heads,
                             num_key_value_heads=self.num_attention_heads,
                             max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=False,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        return LlamaForCausalLM(config)


@dataclass
class StageOne:
    """The embedded default's inputs: the world, its tokenizer, and the cached learned and gold (retain) models."""

    world: dict[str, list[dict]]
    tokenizer: object
    learned_path: Path
    retain_path: Path
    forget_split: str = "forget10"
    retain_split: str = "retain90"

    def load(self, which: str):
        """``"learned"`` or ``"retain"`` model, freshly loaded from the cache."""
        from transformers import AutoModelForCausalLM

        path = self.learned_path if which == "learned" else self.retain_path
        return AutoModelForCausalLM.from_pretrained(path).eval()

    def samples(self, split: str) -> list[dict]:
        return tokenize_qa(self.world[split], self.tokenizer, TEMPLATE, where=f"synthetic {split}")


def stage_one(cache: Path | None = None, n_authors: int = 40, seed: int = 0, shape: TinyLlama = TinyLlama(),
              epochs: int = 60, progress: bool = True, say=print) -> StageOne:
    """Build (or reuse from the cache) the world, its tokenizer, the learned model and the gold retain model."""
    from transformers import PreTrainedTokenizerFast

    folder = (cache or cache_root()) / f"synthetic-v{VERSION}-authors{n_authors}-seed{seed}-epochs{epochs}"
    world = make_world(n_authors, seed)
    if (folder / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
    else:
        tokenizer = build_tokenizer(world)
        tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "world.json").write_text(json.dumps(world, indent=1))
    held = world["real_authors"] + world["world_facts"]
    result = StageOne(world, tokenizer, folder / "learned", folder / "retain")
    for path, split in ((result.learned_path, "full"), (result.retain_path, result.retain_split)):
        if (path / "done").is_file():
            say(f"stage one: reusing {path}")
            continue
        say(f"stage one: training the {path.name} model on {split} + held sets (cached in {path})")
        model = shape.build(tokenizer, seed)
        samples = tokenize_qa(world[split] + held, tokenizer, TEMPLATE, where=f"synthetic {split}")
        loss = fit(model, samples, tokenizer.pad_token_id, epochs=epochs, seed=seed, progress=progress,
                   desc=f"learn {path.name}")
        model.save_pretrained(path)
        (path / "done").write_text(f"final training loss {loss:.5f}\n")
    return result
