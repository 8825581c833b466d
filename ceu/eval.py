"""TOFU's evaluation, with the definitions of TOFU's ``aggregate_eval_stat.py`` (which open-unlearning keeps).

A model is first measured per sample into an *evaluation log* laid out like TOFU's published logs: for each eval set,
``avg_gt_loss`` (mean NLL per answer token), ``avg_paraphrased_loss``, ``average_perturb_loss`` (one per perturbed
answer), ``rougeL_recall`` of the greedy generation and ``generated_text``. :func:`summarize` then turns a log (ours, or
one of TOFU's read by :func:`load_tofu_log`) into the metrics, so the same code scores both:

- answer probability: ``mean exp(-avg_gt_loss)`` on the forget and retain sets; on the held sets (TOFU's real authors
  and world facts) the true answer's share ``p_true / (p_true + sum p_perturbed)``, each ``p`` length-normalised;
- ROUGE-L recall of the greedy answer against the true one (``rouge-score``, with stemming);
- truth ratio, from ``r = exp(mean(perturb loss) - paraphrased loss)`` per sample (the mean over that sample's
  perturbed answers, however many it has): ``mean min(r, 1/r)`` on the forget set, ``mean max(0, 1 - 1/r)`` elsewhere;
- model utility: the harmonic mean of those three metrics over every set but the forget set;
- forget quality: the p-value of the two-sample KS test (``scipy.stats.ks_2samp``) between the forget-set ``r`` of the
  evaluated model and of the model trained on the retain set only.

Logs are checked before they are scored (:func:`check_log`, :func:`check_comparable`): an empty log or set, fields of
different lengths, or two logs whose forget sets differ are refused with the counts, never scored as NaN.
"""
import json
from pathlib import Path

import numpy as np
import torch

from ceu.data import IGNORE_INDEX, QATemplate, check_fields, encode_qa, pad_batch
from ceu.heads import answer_token_losses

ROLES = ("forget", "retain", "held")
TOFU_LOG_SETS = {"eval_log_forget.json": ("forget", "forget"), "eval_log.json": ("retain", "retain"),
                 "eval_real_author_wo_options.json": ("real_authors", "held"),
                 "eval_real_world_wo_options.json": ("world_facts", "held")}
METRICS = ("prob", "rougeL", "truth_ratio")
LOG_FIELDS = ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall")
"""The per-sample fields every eval set of a log has (ceu's logs add ``question`` and ``generated_text``)."""


# --- From per-sample measurements to TOFU's metrics ---------------------------------------------------------------

def truth_ratio_stat(log_set: dict) -> np.ndarray:
    """Per sample ``exp(mean(perturbed losses) - paraphrased loss)``: > 1 when the model prefers the true fact."""
    perturbed = np.array([np.mean(losses) for losses in log_set["average_perturb_loss"]])
    return np.exp(perturbed - np.asarray(log_set["avg_paraphrased_loss"]))


def set_metrics(log_set: dict) -> dict[str, float]:
    """Answer probability, ROUGE-L recall and truth ratio of one eval set (see the module docstring)."""
    p_true = np.exp(-np.asarray(log_set["avg_gt_loss"]))
    if log_set["role"] == "held":
        p_perturbed = np.array([np.exp(-np.asarray(losses)).sum() for losses in log_set["average_perturb_loss"]])
        prob = np.mean(p_true / (p_true + p_perturbed))
    else:
        prob = np.mean(p_true)
    ratio = truth_ratio_stat(log_set)
    if log_set["role"] == "forget":
        truth_ratio = np.mean(np.minimum(ratio, 1 / ratio))
    else:
        truth_ratio = np.mean(np.maximum(0, 1 - 1 / ratio))
    return {"prob": float(prob), "rougeL": float(np.mean(log_set["rougeL_recall"])), "truth_ratio": float(truth_ratio)}


def forget_quality(log: dict, retain_model_log: dict) -> float:
    """KS-test p-value between the forget-set truth-ratio statistics of a model and of the retain-only model."""
    from scipy.stats import ks_2samp

    check_comparable(log, retain_model_log)
    return float(ks_2samp(truth_ratio_stat(_forget_set(log)[1]),
                          truth_ratio_stat(_forget_set(retain_model_log)[1])).pvalue)


def model_utility(per_set: dict[str, dict[str, float]], roles: dict[str, str]) -> float:
    """Harmonic mean of every metric of every set that is not the forget set."""
    from scipy.stats import hmean

    return float(hmean([metrics[name] for set_name, metrics in per_set.items() if roles[set_name] != "forget"
                        for name in METRICS]))


def summarize(log: dict, retain_model_log: dict | None = None) -> dict:
    """Metrics per set, ``model_utility``, and ``forget_quality`` when the retain-only model's log is given."""
    check_log(log)
    if retain_model_log is not None:
        check_log(retain_model_log, "the retain-only model's log")
    per_set = {name: set_metrics(log_set) for name, log_set in log.items()}
    summary = {"sets": per_set, "model_utility": model_utility(per_set, {n: s["role"] for n, s in log.items()})}
    if retain_model_log is not None:
        summary["forget_quality"] = forget_quality(log, retain_model_log)
    return summary


def _forget_set(log: dict) -> tuple[str, dict]:
    forget_sets = [(name, log_set) for name, log_set in log.items() if log_set["role"] == "forget"]
    if len(forget_sets) != 1:
        raise ValueError(f"an evaluation log needs exactly one forget set, found {len(forget_sets)}")
    return forget_sets[0]


def check_log(log, where: str = "the evaluation log") -> None:
    """Refuse a log that cannot be scored: not a non-empty dict of eval sets, a set without a known role or a field of
    :data:`LOG_FIELDS`, a set with no sample or fields of different lengths, a value that is not a number (a perturbed
    entry: not a non-empty list of numbers), or no set but the forget set (model utility would be NaN)."""
    if not isinstance(log, dict) or not log:
        raise ValueError(f"{where} has no eval set (got {type(log).__name__} {str(log)[:40]})")
    for name, log_set in log.items():
        if not isinstance(log_set, dict):
            raise ValueError(f"{where}: eval set {name!r} is {type(log_set).__name__}, not an object of fields")
        if log_set.get("role") not in ROLES:
            raise ValueError(f"{where}: eval set {name!r} has role {log_set.get('role')!r}, not one of {ROLES}")
        missing = [field for field in LOG_FIELDS if not isinstance(log_set.get(field), list)]
        if missing:
            raise ValueError(f"{where}: eval set {name!r} has no per-sample list {missing[0]!r} "
                             f"(fields: {', '.join(log_set)})")
        questions = log_set.get("question")
        if questions is not None and not (isinstance(questions, list) and all(isinstance(q, str) for q in questions)):
            raise ValueError(f"{where}: eval set {name!r} has a 'question' field that is not a list of strings")
        fields = LOG_FIELDS if questions is None else (*LOG_FIELDS, "question")
        counts = {field: len(log_set[field]) for field in fields}
        if len(set(counts.values())) != 1 or not counts["avg_gt_loss"]:
            described = ", ".join(f"{field} {count}" for field, count in counts.items())
            problem = "no sample" if not any(counts.values()) else "fields of different lengths"
            raise ValueError(f"{where}: eval set {name!r} has {problem} ({described})")
        for field in LOG_FIELDS:
            listed = field == "average_perturb_loss"  # one loss per perturbed answer
            for index, value in enumerate(log_set[field]):
                values = value if listed else [value]
                if not (isinstance(values, list) and values
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                    allowed = "a non-empty list of numbers" if listed else "a number"
                    raise ValueError(f"{where}: eval set {name!r} sample {index}: {field} must be {allowed}, "
                                     f"got {str(value)[:40]}")
    if all(log_set["role"] == "forget" for log_set in log.values()):
        raise ValueError(f"{where} has only forget sets ({', '.join(log)}): model utility needs a retain or held set")


def check_comparable(log: dict, retain_model_log: dict) -> None:
    """The two logs of a forget quality score the same forget set: the same number of samples, and the same questions
    where both logs record them (ceu's do; TOFU's aggregated logs do not, so for them only the count is checked)."""
    (name, forget), (retain_name, retain_forget) = _forget_set(log), _forget_set(retain_model_log)
    count, retain_count = len(forget["avg_gt_loss"]), len(retain_forget["avg_gt_loss"])
    if count != retain_count:
        raise ValueError(f"forget quality compares one forget set under two models, but the model's log has "
                         f"{count} forget samples (set {name!r}) and the retain-only model's {retain_count} "
                         f"(set {retain_name!r})")
    questions, retain_questions = forget.get("question"), retain_forget.get("question")
    if questions is not None and retain_questions is not None and questions != retain_questions:
        index = next(i for i, (a, b) in enumerate(zip(questions, retain_questions)) if a != b)
        raise ValueError(f"forget quality compares one forget set under two models, but forget sample {index} is "
                         f"{questions[index][:60]!r} in the model's log (set {name!r}) and "
                         f"{retain_questions[index][:60]!r} in the retain-only model's (set {retain_name!r})")


def load_tofu_log(path) -> dict:
    """An evaluation log from a file, in either format: TOFU's ``*_eval_log_aggregated.json`` (per-sample values
    keyed by index, put in index order) or ceu's own (the ``eval_log_<model>.json`` that ``ceu unlearn`` writes, the
    dict :func:`evaluate_model` returns). Checked with :func:`check_log`; errors name the file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON evaluation log ({error})") from None
    if isinstance(raw, dict) and any(file_name in raw for file_name in TOFU_LOG_SETS):
        log = _from_tofu(raw, path)
    elif isinstance(raw, dict) and raw and all(isinstance(block, dict) and "role" in block for block in raw.values()):
        log = raw
    else:
        found = ", ".join(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} is neither TOFU's aggregated evaluation log (blocks {', '.join(TOFU_LOG_SETS)}) "
                         f"nor ceu's (eval sets with a 'role'); found: {found[:200]}")
    check_log(log, str(path))
    return log


def _from_tofu(raw: dict, path) -> dict:
    """TOFU's blocks as ceu's eval sets; every field of a block must hold the same sample indices."""
    log = {}
    for file_name, (name, role) in TOFU_LOG_SETS.items():
        if not isinstance(raw.get(file_name), dict):
            raise ValueError(f"{path} has no {file_name!r} block (blocks: {', '.join(raw)})")
        block = raw[file_name]
        log[name] = {"role": role}
        indices = None
        for key in LOG_FIELDS:
            values = block.get(key)
            if not isinstance(values, dict):
                raise ValueError(f"{path}: block {file_name!r} has no per-sample {key!r} (fields: {', '.join(block)})")
            if indices is None:
                indices = set(values)
            elif set(values) != indices:
                raise ValueError(f"{path}: block {file_name!r} has {len(values)} samples in {key!r} and "
                                 f"{len(indices)} in {LOG_FIELDS[0]!r} (or other indices)")
            try:
                order = sorted(values, key=int)
            except ValueError:
                raise ValueError(f"{path}: block {file_name!r} field {key!r} has sample keys that are not indices: "
                                 f"{', '.join(sorted(values))[:80]}") from None
            log[name][key] = [values[index] for index in order]
    return log


# --- Measuring a model ------------------------------------------------------------------------------------------

@torch.no_grad()
def average_answer_losses(model, tokenizer, questions: list[str], answers: list[str], template: QATemplate,
                          batch_size: int = 64, impl: str = "auto") -> list[float]:
    """Mean NLL per answer token of each (question, answer), through the fused cross-entropy (no logits)."""
    device = next(model.parameters()).device
    samples = [encode_qa(tokenizer, q, a, template) for q, a in zip(questions, answers)]
    averages = []
    for start in range(0, len(samples), batch_size):
        batch = pad_batch(samples[start:start + batch_size], tokenizer.pad_token_id)
        losses, mask = answer_token_losses(model, {k: v.to(device) for k, v in batch.items()}, impl)
        averages += (losses.float().sum(1) / mask.sum(1)).tolist()
    return averages


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: list[str], template: QATemplate, max_new_tokens: int = 48,
                   batch_size: int = 64) -> list[str]:
    """Greedy generations from the prompts (left-padded batches), decoded without special tokens."""
    device = next(model.parameters()).device
    prompts = []
    for question in questions:
        sample = encode_qa(tokenizer, question, "x", template)
        prompts.append([t for t, label in zip(sample["input_ids"], sample["labels"]) if label == IGNORE_INDEX])
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [text.strip() for text in texts]


def rouge_l_recall(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(reference, prediction)["rougeL"].recall
            for prediction, reference in zip(predictions, references)]


def evaluate_model(model, tokenizer, eval_sets: dict[str, tuple[str, list[dict]]], template: QATemplate = QATemplate(),
                   batch_size: int = 64, max_new_tokens: int = 48, impl: str = "auto") -> dict:
    """The evaluation log of ``model`` on ``{name: (role, TOFU-format records)}`` (role: forget, retain or held).

    Records without ``paraphrased_answer`` (or with a null one) use the answer itself, as TOFU does for its held sets;
    every record needs ``perturbed_answer``, a non-empty list of strings, for the truth ratio. Every perturbed answer
    is scored, however many a record has. The log also keeps each set's questions (see :func:`check_comparable`).
    All records are checked before the model runs.
    """
    if not eval_sets:
        raise ValueError("eval_sets is empty: name at least a forget and a retain or held set")
    for name, (role, records) in eval_sets.items():
        check_eval_records(name, role, records)
    model.eval()
    log = {}
    for name, (role, records) in eval_sets.items():
        records = list(records)
        questions = [r["question"] for r in records]

        def losses(questions, answers):
            return average_answer_losses(model, tokenizer, questions, answers, template, batch_size, impl)

        # every (question, perturbed answer) pair in one pass, then split back into each record's list
        perturbed = [(r["question"], answer) for r in records for answer in r["perturbed_answer"]]
        flat = iter(losses(*map(list, zip(*perturbed))))
        generated = greedy_answers(model, tokenizer, questions, template, max_new_tokens, batch_size)
        log[name] = {"role": role,
                     "question": questions,
                     "avg_gt_loss": losses(questions, [r["answer"] for r in records]),
                     "avg_paraphrased_loss": losses(questions, [r.get("paraphrased_answer") or r["answer"]
                                                                for r in records]),
                     "average_perturb_loss": [[next(flat) for _ in r["perturbed_answer"]] for r in records],
                     "rougeL_recall": rouge_l_recall(generated, [r["answer"] for r in records]),
                     "generated_text": generated}
    return log


def check_eval_records(name: str, role: str, records) -> None:
    """One eval set's role and records: question and answer strings (:func:`ceu.data.check_fields`), an optional
    string ``paraphrased_answer`` and a non-empty ``perturbed_answer`` list of strings; errors name the set, the
    record and the field."""
    if role not in ROLES:
        raise ValueError(f"eval set {name!r}: role must be one of {ROLES}, got {role!r}")
    where = f"eval set {name!r}"
    check_fields(records, ("question", "answer"), where)
    for index, record in enumerate(records):
        paraphrased = record.get("paraphrased_answer")
        if paraphrased is not None and not isinstance(paraphrased, str):
            raise ValueError(f"{where} record {index}: 'paraphrased_answer' must be a string or absent, "
                             f"got {str(paraphrased)[:40]}")
        perturbed = record.get("perturbed_answer")
        if not (isinstance(perturbed, list) and perturbed and all(isinstance(a, str) for a in perturbed)):
            raise ValueError(f"{where} record {index}: 'perturbed_answer' must be a non-empty list of strings (the "
                             f"truth ratio compares them with the answer), got {str(perturbed)[:40]}")


# --- Reporting --------------------------------------------------------------------------------------------------

def headline(summary: dict, forget_set: str, retain_loss: float | None = None) -> dict:
    """The numbers a results block reports for one model."""
    forget = summary["sets"][forget_set]
    block = {"forget_answer_prob": forget["prob"], "forget_rougeL": forget["rougeL"],
             "forget_truth_ratio": forget["truth_ratio"], "model_utility": summary["model_utility"]}
    if "forget_quality" in summary:
        block["forget_quality"] = summary["forget_quality"]
    if retain_loss is not None:
        block["retain_loss"] = retain_loss
    return block


def format_table(blocks: dict[str, dict]) -> str:
    """A plain-text table: one row per metric, one column per model."""
    names = list(blocks)
    metrics = [m for m in next(iter(blocks.values())) if all(m in b for b in blocks.values())]
    width = max(map(len, metrics)) + 2
    lines = [" " * width + "".join(f"{name:>14}" for name in names)]
    for metric in metrics:
        lines.append(f"{metric:<{width}}" + "".join(f"{_format(blocks[name][metric]):>14}" for name in names))
    return "\n".join(lines)


def _format(value: float) -> str:
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.3e}"
    return f"{value:.4f}"


def plot_training_log(log_path, png_path) -> None:
    """PNG of the JSONL training log: L_fgt, L_rtn against ε, and λ over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["forget_loss"] for r in records], color="tab:red")
    axes[0].set(title="forget loss L_fgt (LMF)", xlabel="optimizer step")
    axes[1].plot(steps, [r["retain_loss"] for r in records], color="tab:blue", label="L_rtn")
    axes[1].plot(steps, [r["epsilon"] for r in records], color="black", linestyle="--", label="ε")
    axes[1].set(title="retain loss L_rtn vs ε", xlabel="optimizer step")
    axes[1].legend()
    axes[2].plot(steps, [r["lambda"] for r in records], color="tab:green")
    axes[2].set(title="dual variable λ", xlabel="optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
