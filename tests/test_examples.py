"""The examples of README.md's "Use the fused losses in your own trainer" (examples/*.py), each run on a tiny Llama
against one eager reference run: open-unlearning's PDU losses on materialised logits, the Lagrangian, λ's dual step
and AdamW, two optimizer steps on the full batch."""
import sys
from pathlib import Path

import pytest
import torch

import ceu
from ceu.data import IGNORE_INDEX, pad_batch
from helpers import assert_close, forbid_head_calls, qa_samples, tiny_model

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

FORGET, RETAIN = qa_samples(4), qa_samples(4, seed=1)
STEPS, LR, LAMBDA_INIT, DUAL_LR, EPSILON = 2, 1e-5, 1.0, 2.0, 1.0


def reference_run():
    """λ at each step and the final weights, from the losses on materialised logits (float64 from the logits on)."""
    model = tiny_model()
    forget, retain = pad_batch(FORGET, 0), pad_batch(RETAIN, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    lam, lambdas, first_losses = LAMBDA_INIT, [], None
    for _ in range(STEPS):
        logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits[:, :-1].double()
        mask = forget["labels"][:, 1:] != IGNORE_INDEX
        forget_loss = (((logits.max(-1).values - logits.mean(-1)) ** 2) * mask).sum() / mask.sum()
        retain_loss = model(**retain).loss
        first_losses = first_losses or (forget_loss.item(), retain_loss.item())
        (forget_loss + lam * (retain_loss - EPSILON)).backward()
        optimizer.step()
        optimizer.zero_grad()
        lam = max(0.0, lam + DUAL_LR * (retain_loss.item() - EPSILON))
        lambdas.append(lam)
    return lambdas, first_losses, dict(model.named_parameters())


REFERENCE = reference_run()


def check(model, lambdas):
    expected_lambdas, _, expected_weights = REFERENCE
    assert_close("lambdas", torch.tensor(lambdas), torch.tensor(expected_lambdas), torch.float32)
    initial = dict(tiny_model().named_parameters())
    assert any(not torch.equal(p, initial[name]) for name, p in model.named_parameters())
    for name, weight in model.named_parameters():
        assert_close(name, weight.detach(), expected_weights[name].detach(), torch.float32)


def primal_dual():
    return ceu.PrimalDual(lambda_init=LAMBDA_INIT, dual_lr=DUAL_LR, epsilon=EPSILON)


def recording(primal_dual):
    """λ after each dual step."""
    lambdas, step = [], primal_dual.step

    def recorded_step():
        step()
        lambdas.append(primal_dual.lam.item())

    primal_dual.step = recorded_step
    return lambdas


def test_objective_is_the_lagrangian_of_the_reference_losses():
    model = tiny_model()
    objective = ceu.pdu_objective(model, pad_batch(FORGET, 0), pad_batch(RETAIN, 0), lam=2.0, epsilon=0.5,
                                  forget_weight=3.0)
    forget_loss, retain_loss = REFERENCE[1]
    assert_close("losses", torch.stack(objective[1:]).detach(), torch.tensor([forget_loss, retain_loss]),
                 torch.float32)
    assert_close("lagrangian", objective.loss.detach(), torch.tensor(3 * forget_loss + 2 * (retain_loss - 0.5)),
                 torch.float32)
    with pytest.raises(ValueError, match="either primal_dual or both lam and epsilon"):
        ceu.pdu_objective(model, pad_batch(FORGET, 0), pad_batch(RETAIN, 0), primal_dual(), lam=1.0, epsilon=0.1)
    with pytest.raises(ValueError, match="either primal_dual"):
        ceu.pdu_objective(model, pad_batch(FORGET, 0), pad_batch(RETAIN, 0), lam=1.0)


def test_plain_loop_example():
    from pdu_loop import unlearn

    model = tiny_model()
    batch_pair = (pad_batch(FORGET, 0), pad_batch(RETAIN, 0))
    hook = forbid_head_calls(model)
    result = unlearn(model, [batch_pair] * STEPS, epsilon=EPSILON, lr=LR, lambda_init=LAMBDA_INIT, dual_lr=DUAL_LR)
    hook.remove()
    assert result.steps == STEPS
    check(model, [REFERENCE[0][0], result.lam.item()])


def test_hf_trainer_subclass_example(tmp_path):
    from pdu_hf_trainer import unlearn

    model, dual = tiny_model(), primal_dual()
    lambdas = recording(dual)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(FORGET),
                                          num_train_epochs=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                                          optim="adamw_torch", report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = unlearn(model, FORGET, RETAIN, dual, args)
    assert trainer.state.global_step == STEPS
    check(model, lambdas)


def test_lightning_example():
    pl = pytest.importorskip("pytorch_lightning")
    from pdu_lightning import PDUModule

    from ceu.hf import ForgetRetainCollator, ForgetRetainDataset

    model, dual = tiny_model(), primal_dual()
    lambdas = recording(dual)
    loader = torch.utils.data.DataLoader(ForgetRetainDataset(FORGET, RETAIN), batch_size=len(FORGET),
                                         collate_fn=ForgetRetainCollator(0))
    trainer = pl.Trainer(max_epochs=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(PDUModule(model, dual, lr=LR), loader)
    assert trainer.global_step == STEPS
    check(model, lambdas)


def test_readme_quotes_the_examples_verbatim():
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme.split("### Use the fused losses in your own trainer", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```python\n")[2:]  # the first block is the patch, not an example
    examples = [path.read_text() for path in sorted((root / "examples").glob("*.py"))]
    assert len(blocks) == 3
    for block in blocks:
        code = block.split("```", 1)[0]
        assert any(code in example for example in examples), f"README block not in examples/:\n{code}"
