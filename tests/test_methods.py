"""ceu.methods: each method's losses and gradients on the fused path, from one forward over both batches, against an
eager float64 reference on materialised logits from the model's own separate forwards (a tiny Llama with a biased
head, ragged prompts and answers, right padding, forget and retain batches of different lengths), the fused KL
between two heads, and the methods' settings."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ceu.config import UnlearnConfig
from ceu.data import IGNORE_INDEX, pad_batch
from ceu.methods import Objective, hyperparameters, linear_kl_divergence
from ceu.primal_dual import PrimalDual
from ceu.reference import lmf_loss
from helpers import TINY_VOCAB, assert_close, forbid_head_calls, head_inputs, tiny_model


def ragged_samples(count, seed):
    """Prompts of 2-5 tokens and answers of 1-4 tokens, so the padded batches mix lengths 3 to 9."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        prompt, answer = 2 + index % 4, 1 + (index // 2) % 4
        ids = torch.randint(3, TINY_VOCAB, (prompt + answer,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def float64_model():
    """The tiny Llama in float64, its LM head given a bias (the fused losses' bias path)."""
    model = tiny_model().double()
    model.config.use_cache = False
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, dtype=torch.float64)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(0.1 * torch.randn(head.out_features, generator=torch.Generator().manual_seed(11),
                                            dtype=torch.float64))
    model.set_output_embeddings(biased)
    return model


def perturb(model, seed=3, scale=0.05):
    """The model after a few steps of 'training': every weight moved, so log p_θ ≠ log p_ref."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter += scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)


def logits_of(model, batch):
    """The batch's logits from the model's own forward, on that batch alone."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def eager_token_nll(model, batch):
    """Per-token answer NLL ``[B, T-1]`` (0 elsewhere) and the answer mask, from the model's own logits."""
    logits = logits_of(model, batch)[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none") * mask
    return nll, mask


def eager_losses(method, model, start, forget, retain, beta=None, delta=0.0, retain_loss="nll", forget_mask="shifted"):
    """The methods' definitions written out on materialised float64 logits, one forward per batch."""
    if retain_loss == "nll":
        nll_r, mask_r = eager_token_nll(model, retain)
        retain_value = nll_r.sum() / mask_r.sum()
    else:
        logits = logits_of(model, retain)[:, :-1]
        with torch.no_grad():
            ref = logits_of(start, retain)[:, :-1]
        mask_r = retain["labels"][:, 1:] != IGNORE_INDEX
        kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        retain_value = (kl * mask_r).sum() / mask_r.sum()
    if method == "pdu_all":  # every position of the forget batch's own padded shape
        return lmf_loss(logits_of(model, forget)), retain_value
    if method == "pdu":
        logits, labels = logits_of(model, forget), forget["labels"]
        if forget_mask == "shifted":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return lmf_loss(logits, labels != IGNORE_INDEX), retain_value
    nll, mask = eager_token_nll(model, forget)
    if method in ("gradascent", "graddiff"):
        return -nll.sum() / mask.sum(), retain_value
    log_p = -nll.sum(1)
    if method == "npo":
        with torch.no_grad():
            log_p_ref = -eager_token_nll(start, forget)[0].sum(1)
        per_sample = -(2 / beta) * F.logsigmoid(-beta * (log_p - log_p_ref))
    else:
        per_sample = -(2 / beta) * F.logsigmoid(-(beta / mask.sum(1)) * log_p - beta * delta)
    return per_sample.mean(), retain_value


CASES = [("gradascent", {}), ("graddiff", {}), ("npo", {}), ("npo", {"beta": 0.7}), ("simnpo", {}),
         ("simnpo", {"beta": 2.0, "delta": 0.3}), ("graddiff", {"retain_loss": "kl"}),
         ("pdu", {}), ("pdu", {"retain_loss": "kl"}), ("pdu", {"forget_mask": "unshifted"}),
         ("pdu_all", {}), ("pdu_all", {"retain_loss": "kl"})]


@pytest.mark.parametrize("longer", ["retain", "forget"])
@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_one_forward_losses_and_gradients_match_two_forwards_eager_float64(method, options, longer):
    """Every method's losses and parameter gradients from one forward over both batches (the model called once per
    micro-batch; gradient ascent: twice, its retain forward without a graph) equal the definitions on each batch's own
    forward, whichever batch the pairing pads."""
    forget_data = ragged_samples(5, seed=1)  # padded to 7 tokens
    retain_data = ragged_samples(7, seed=2) if longer == "retain" else ragged_samples(3, seed=2)  # 8 or 6 tokens
    forget, retain = pad_batch(forget_data, 0), pad_batch(retain_data, 0)
    assert (forget["input_ids"].shape[1] < retain["input_ids"].shape[1]) == (longer == "retain")
    model = float64_model()
    start = copy.deepcopy(model).eval()
    settings = dict(options, method="pdu", forget_positions="all") if method == "pdu_all" else \
        dict(options, method=method)
    config = UnlearnConfig(impl="torch", **settings)
    objective = Objective(model, forget_data, config)  # NPO's reference and the KL copy: the starting model
    perturb(model)
    model.train()  # the training step's mode (the tiny Llama has no dropout)
    parameters = [p for p in model.parameters()]

    forwards = []
    counter = model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    hook = forbid_head_calls(model)
    forget_loss, retain_loss = objective.losses(model, forget, retain)
    hook.remove()
    counter.remove()
    assert len(forwards) == (2 if method == "gradascent" else 1)
    beta = hyperparameters(config)["beta"]
    expected_forget, expected_retain = eager_losses(method, model, start, forget, retain, beta,
                                                    options.get("delta", 0.0), options.get("retain_loss", "nll"),
                                                    options.get("forget_mask", "shifted"))
    assert_close("forget loss", forget_loss, expected_forget, torch.float64)
    assert_close("retain loss", retain_loss, expected_retain, torch.float64)
    if method == "npo":  # the reference is the starting model's, not the current one's: the margin is not 0
        assert abs(forget_loss.item() - (2 / beta) * math.log(2.0)) > 1e-3
    if method == "gradascent":  # its retain loss is reported against ε, not trained on
        assert not retain_loss.requires_grad
        expected_retain = expected_retain.detach()
    weights = (1.3, 0.7)
    ours = torch.autograd.grad(weights[0] * forget_loss + weights[1] * retain_loss, parameters, allow_unused=True)
    expected = torch.autograd.grad(weights[0] * expected_forget + weights[1] * expected_retain, parameters,
                                   allow_unused=True)
    for (name, parameter), got, want in zip(model.named_parameters(), ours, expected):
        got = torch.zeros_like(parameter) if got is None else got
        want = torch.zeros_like(parameter) if want is None else want
        assert_close(f"grad {name}", got, want, torch.float64)


def test_npo_starts_at_its_fixed_point_and_padding_changes_nothing():
    """At the starting model NPO's margin is 0 for every sample: loss (2/β)·log 2 however the batch is padded."""
    forget_data, retain_data = ragged_samples(4, seed=4), ragged_samples(2, seed=5)
    model = float64_model()
    objective = Objective(model, forget_data, UnlearnConfig(impl="torch", method="npo", beta=0.5))
    for padded in (forget_data, forget_data[:1], forget_data[1:2] + forget_data[3:]):
        forget_loss, _ = objective.losses(model, pad_batch(padded, 0), pad_batch(retain_data, 0))
        assert_close("npo at start", forget_loss, torch.tensor(4 * math.log(2.0), dtype=torch.float64),
                     torch.float64)


def test_scales_give_sums_for_global_means():
    """``token_scales`` / ``sample_scale`` replace the local means by scale · sum (the data-parallel path)."""
    forget_data, retain_data = ragged_samples(4, seed=6), ragged_samples(3, seed=7)
    forget, retain = pad_batch(forget_data, 0), pad_batch(retain_data, 0)
    model = float64_model()
    for method, options in (("graddiff", {}), ("simnpo", {}), ("pdu", {"retain_loss": "kl"})):
        objective = Objective(model, forget_data, UnlearnConfig(impl="torch", method=method, **options))
        mean_forget, mean_retain = objective.losses(model, forget, retain)
        forget_tokens = sum(int(sum(label != IGNORE_INDEX for label in s["labels"][1:])) for s in forget_data)
        retain_tokens = sum(int(sum(label != IGNORE_INDEX for label in s["labels"][1:])) for s in retain_data)
        scaled_forget, scaled_retain = objective.losses(model, forget, retain,
                                                        (2.0 / forget_tokens, 2.0 / retain_tokens),
                                                        2.0 / len(forget_data))
        assert_close(f"{method} forget", scaled_forget, 2 * mean_forget, torch.float64)
        assert_close(f"{method} retain", scaled_retain, 2 * mean_retain, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_kl_divergence_against_eager(dtype, bias, monkeypatch):
    monkeypatch.setattr("ceu.methods.KL_CHUNK_BYTES", 8 * 97 * 5)  # 5-token chunks: the chunk loop runs ragged
    hidden, weight, b = head_inputs(23, 16, 97, torch.float64, bias=bias, seed=1)
    ref_hidden, ref_weight, ref_b = head_inputs(23, 16, 97, torch.float64, bias=bias, seed=2)
    inputs = [t if t is None else t.to(dtype).requires_grad_() for t in (hidden, weight, b)]
    kl = linear_kl_divergence(*inputs, ref_hidden.to(dtype), ref_weight.to(dtype),
                              None if ref_b is None else ref_b.to(dtype))
    upstream = torch.rand(23, dtype=torch.float64)
    got = torch.autograd.grad(kl, [t for t in inputs if t is not None], upstream.to(kl.dtype))

    leaves = [t if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    logits = leaves[0] @ leaves[1].T + (0 if b is None else leaves[2])
    ref_logits = ref_hidden @ ref_weight.T + (0 if ref_b is None else ref_b)
    expected = F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    want = torch.autograd.grad(expected, [t for t in leaves if t is not None], upstream)
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("kl", kl, expected, dtype)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        assert g.dtype == dtype
        assert_close(f"grad {name}", g, w, dtype)


def test_linear_kl_divergence_is_zero_against_itself_and_refuses_mismatched_shapes():
    hidden, weight, _ = head_inputs(7, 8, 31, torch.float64)
    assert_close("kl(p, p)", linear_kl_divergence(hidden, weight, None, hidden, weight), torch.zeros(7),
                 torch.float64)
    with pytest.raises(ValueError, match="same tokens"):
        linear_kl_divergence(hidden, weight, None, hidden[:3], weight)


def test_hyperparameters_defaults_and_refusals():
    assert hyperparameters(UnlearnConfig(method="npo")) == dict(forget_weight=1.0, retain_weight=1.0, beta=0.1,
                                                                delta=0.0)
    assert hyperparameters(UnlearnConfig(method="simnpo")) == dict(forget_weight=0.125, retain_weight=1.0, beta=4.5,
                                                                   delta=0.0)
    assert hyperparameters(UnlearnConfig(method="simnpo", forget_weight=1.0, beta=2.0))["forget_weight"] == 1.0
    assert hyperparameters(UnlearnConfig(method="gradascent"))["retain_weight"] == 0.0
    with pytest.raises(ValueError, match="forget_mask='unshifted' is an option of PDU"):
        hyperparameters(UnlearnConfig(method="npo", forget_mask="unshifted"))
    with pytest.raises(ValueError, match="dual_update_per_epoch=True is an option of PDU"):
        hyperparameters(UnlearnConfig(method="graddiff", dual_update_per_epoch=True))
    with pytest.raises(ValueError, match="PDU's retain weight is lambda"):
        hyperparameters(UnlearnConfig(retain_weight=2.0))
    with pytest.raises(ValueError, match="gradascent has no retain term"):
        hyperparameters(UnlearnConfig(method="gradascent", retain_weight=1.0))
    with pytest.raises(ValueError, match="beta must be > 0"):
        hyperparameters(UnlearnConfig(method="npo", beta=0.0))
    with pytest.raises(ValueError, match="method must be one of"):
        UnlearnConfig(method="dpo")


def test_fixed_methods_hold_lambda_at_alpha_and_pdu_keeps_its_dual_step():
    model = float64_model()
    data = ragged_samples(2, seed=8)
    fixed = Objective(model, data, UnlearnConfig(method="simnpo", retain_weight=2.5)).primal_dual(0.1, 4)
    assert (fixed.lam.item(), fixed.dual_lr, fixed.warmup_steps, fixed.forget_weight) == (2.5, 0.0, 0, 0.125)
    fixed.observe(torch.tensor(9.0))
    fixed.step()
    assert fixed.lam.item() == 2.5
    pdu = Objective(model, data, UnlearnConfig(lambda_init=7.0, dual_lr=3.0)).primal_dual(0.1, 4)
    assert isinstance(pdu, PrimalDual) and (pdu.lam.item(), pdu.dual_lr, pdu.warmup_steps) == (7.0, 3.0, 4)
    per_epoch = Objective(model, data, UnlearnConfig(dual_update_per_epoch=True)).primal_dual(0.1, 4)
    assert per_epoch.warmup_steps == 3


def test_npo_and_kl_refuse_resume():
    model = float64_model()
    for settings in (dict(method="npo"), dict(method="graddiff", retain_loss="kl")):
        with pytest.raises(ValueError, match="resume_from"):
            Objective(model, ragged_samples(2, seed=9), UnlearnConfig(resume_from="x.pt", **settings))


def test_per_epoch_dual_update_moves_lambda_only_at_epoch_ends(tmp_path):
    """dual_update_per_epoch: λ is constant within an epoch and moves at its end by η·(whole-set retain loss − ε),
    first at the end of epoch dual_warmup_epochs (6 forget samples, batch 2: 3 steps per epoch)."""
    import json

    from ceu.train import unlearn
    from helpers import qa_samples

    log = tmp_path / "log.jsonl"
    config = UnlearnConfig(epochs=3, batch_size=2, lr=1e-3, lambda_init=1000.0, dual_lr=1.0, epsilon=50.0,
                           dual_warmup_epochs=1, dual_update_per_epoch=True, progress=False, log_path=str(log),
                           impl="torch")
    result = unlearn(tiny_model(), qa_samples(6), qa_samples(5, seed=1), config)
    lambdas = [json.loads(line)["lambda"] for line in log.read_text().splitlines()]
    assert len(lambdas) == 9
    for epoch in range(3):
        assert lambdas[3 * epoch] == lambdas[3 * epoch + 1] == (1000.0 if epoch == 0 else lambdas[3 * epoch - 1])
        step = lambdas[3 * epoch + 2] - lambdas[3 * epoch + 1]
        assert -50.0 < step < -40.0  # η·(L − ε) with a retain cross-entropy L of a few nats
    assert result.final_lambda == lambdas[-1]


def test_trainer_runs_the_methods_and_refuses_the_per_epoch_update(tmp_path):
    from ceu.hf import unlearn_with_trainer
    from helpers import qa_samples

    forget, retain = qa_samples(4), qa_samples(4, seed=1)
    for method in ("npo", "simnpo"):
        config = UnlearnConfig(method=method, epochs=1, batch_size=2, lr=1e-3, progress=False, impl="torch",
                               mixed_precision="no")
        result = unlearn_with_trainer(tiny_model(), forget, retain, config, output_dir=tmp_path / method)
        assert result.steps == 2 and result.final_lambda == 1.0  # λ = α, fixed
    with pytest.raises(ValueError, match="dual_update_per_epoch runs in ceu.unlearn's loop only"):
        unlearn_with_trainer(tiny_model(), forget, retain, UnlearnConfig(dual_update_per_epoch=True, progress=False),
                             output_dir=tmp_path / "pdu")


def test_command_line_options_reach_the_config(tmp_path):
    from ceu.cli import _config, build_parser

    args = build_parser().parse_args(["unlearn", "--model", "m", "--method", "npo", "--beta", "0.5", "--retain-weight",
                                      "2", "--retain-loss", "kl", "--forget-weight", "0.5"])
    config = _config(args, tmp_path)
    assert (config.method, config.beta, config.retain_weight, config.retain_loss, config.forget_weight) == \
        ("npo", 0.5, 2.0, "kl", 0.5)
    args = build_parser().parse_args(["unlearn", "--model", "m", "--dual-update-per-epoch", "--forget-positions", "all"])
    config = _config(args, tmp_path)
    assert config.dual_update_per_epoch and config.forget_positions == "all" and config.method == "pdu"


@pytest.mark.parametrize("method,empty_batch", [("graddiff", "zero"), ("gradascent", "zero"), ("pdu", "zero"),
                                                ("pdu", "nan")])
def test_a_batch_without_answer_tokens_gives_zero_or_the_references_nan(method, empty_batch):
    """Both token means of a micro-batch pair without answer tokens: 0, or PDU's reference 0/0 (``empty_batch``)."""
    model = float64_model()
    empty = pad_batch([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX] * 3}], 0)
    objective = Objective(model, [], UnlearnConfig(impl="torch", method=method, empty_batch=empty_batch))
    for loss in objective.losses(model, empty, empty):
        assert math.isnan(loss) if empty_batch == "nan" else loss.item() == 0.0
