"""TOFU's evaluation, with the definitions of TOFU's ``aggregate_eval_stat.py`` (which open-unlearning keeps).

A model is first measured per sample into an *evaluation log* laid out like TOFU's published logs: for each eval set,
``avg_gt_loss`` (mean NLL per answer token), ``avg_paraphrased_loss``, ``average_perturb_loss`` (one per perturbed
answer), ``rougeL_recall`` of the greedy generation and ``generated_text``. :func:`summarize` then turns a log (ours, or
one of TOFU's read by :func:`load_tofu_log`) into the metrics, so the same code scores both:

- answer probability: ``mean exp(-avg_gt_loss)`` on the forget and retain sets; on the held sets (TOFU's real authors
  and world facts) the true answer's share ``p_true / (p_true + sum p_perturbed)``, each ``p`` length-normalised;
- ROUGE-L recall of the greedy answer against the true one (``rouge-score``, with stemming);
- truth ratio, from ``r = exp(mean(perturb loss) - paraphrased loss)`` per sample: ``mean min(r, 1/r)`` on the forget
  set, ``mean max(0, 1 - 1/r)`` elsewhere;
- model utility: the harmonic mean of those three metrics over every set but the forget set;
- forget quality: the p-value of the two-sample KS test (``scipy.stats.ks_2samp``) between the forget-set ``r`` of the
  evaluated model and of the model trained on the retain set only.
"""
import json
from pathlib import Path

import numpy as np
import torch

from ceu.data import IGNORE_INDEX, QATemplate, encode_qa, pad_batch
from ceu.heads import answer_token_losses

ROLES = ("forget", "retain", "held")
TOFU_LOG_SETS = {"eval_log_forget.json": ("forget", "forget"), "eval_log.json": ("retain", "retain"),
                 "eval_real_author_wo_options.json": ("real_authors", "held"),
                 "eval_real_world_wo_options.json": ("world_facts", "held")}
METRICS = ("prob", "rougeL", "truth_ratio")


# --- From per-sample measurements to TOFU's metrics ---------------------------------------------------------------

def truth_ratio_stat(log_set: dict) -> np.ndarray:
    """Per sample ``exp(mean(perturbed losses) - paraphrased loss)``: > 1 when the model prefers the true fact."""
    perturbed = np.array([np.mean(losses) for losses in log_set["average_perturb_loss"]])
    return np.exp(perturbed - np.asarray(log_set["avg_paraphrased_loss"]))


def set_metrics(log_set: dict) -> dict[str, float]:
    """Answer probability, ROUGE-L recall and truth ratio of one eval set (see the module docstring)."""
    p_true = np.exp(-np.asarray(log_set["avg_gt_loss"]))
    if log_set["role"] == "held":
        p_perturbed = np.exp(-np.array([np.asarray(losses) for losses in log_set["average_perturb_loss"]]))
        prob = np.mean(p_true / (p_true + p_perturbed.sum(-1)))
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

    return float(ks_2samp(truth_ratio_stat(_forget_set(log)), truth_ratio_stat(_forget_set(retain_model_log))).pvalue)


def model_utility(per_set: dict[str, dict[str, float]], roles: dict[str, str]) -> float:
    """Harmonic mean of every metric of every set that is not the forget set."""
    from scipy.stats import hmean

    return float(hmean([metrics[name] for set_name, metrics in per_set.items() if roles[set_name] != "forget"
                        for name in METRICS]))


def summarize(log: dict, retain_model_log: dict | None = None) -> dict:
    """Metrics per set, ``model_utility``, and ``forget_quality`` when the retain-only model's log is given."""
    per_set = {name: set_metrics(log_set) for name, log_set in log.items()}
    summary = {"sets": per_set, "model_utility": model_utility(per_set, {n: s["role"] for n, s in log.items()})}
    if retain_model_log is not None:
        summary["forget_quality"] = forget_quality(log, retain_model_log)
    return summary


def _forget_set(log: dict) -> dict:
    forget_sets = [log_set for log_set in log.values() if log_set["role"] == "forget"]
    if len(forget_sets) != 1:
        raise ValueError(f"an evaluation log needs exactly one forget set, found {len(forget_sets)}")
    return forget_sets[0]


def load_tofu_log(path) -> dict:
    """One of TOFU's ``*_eval_log_aggregated.json`` files as an evaluation log (per-sample values in index order)."""
    raw = json.loads(Path(path).read_text())
    log = {}
    for file_name, (name, role) in TOFU_LOG_SETS.items():
        if file_name not in raw:
            raise ValueError(f"{path} has no {file_name!r} block (blocks: {', '.join(raw)})")
        block = raw[file_name]
        log[name] = {"role": role}
        for key in ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall"):
            log[name][key] = [block[key][index] for index in sorted(block[key], key=int)]
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

    Records without ``paraphrased_answer`` use the answer itself, as TOFU does for its held sets; every record needs
    ``perturbed_answer`` (a list) for the truth ratio.
    """
    model.eval()
    log = {}
    for name, (role, records) in eval_sets.items():
        if role not in ROLES:
            raise ValueError(f"eval set {name!r}: role must be one of {ROLES}, got {role!r}")
        for index, record in enumerate(records):
            if not record.get("perturbed_answer"):
                raise ValueError(f"eval set {name!r} sample {index} has no 'perturbed_answer' list")
        questions = [r["question"] for r in records]

        def losses(answers):
            return average_answer_losses(model, tokenizer, questions, answers, template, batch_size, impl)

        n_perturbed = len(records[0]["perturbed_answer"])
        per_perturbed = [losses([r["perturbed_answer"][k] for r in records]) for k in range(n_perturbed)]
        generated = greedy_answers(model, tokenizer, questions, template, max_new_tokens, batch_size)
        log[name] = {"role": role,
                     "avg_gt_loss": losses([r["answer"] for r in records]),
                     "avg_paraphrased_loss": losses([r.get("paraphrased_answer") or r["answer"] for r in records]),
                     "average_perturb_loss": [list(row) for row in zip(*per_perturbed)],
                     "rougeL_recall": rouge_l_recall(generated, [r["answer"] for r in records]),
                     "generated_text": generated}
    return log


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
