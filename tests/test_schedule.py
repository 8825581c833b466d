"""ceu.schedule: one schedule, two front ends. The definitions on a ragged case, and ceu.unlearn and
ceu.hf.PrimalDualTrainer running the same optimizer steps (micro-batches per step), the same LR at every step, the same
steps with λ held and the same weight-decay groups for one UnlearnConfig."""
import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ceu.config import UnlearnConfig
from ceu.primal_dual import PrimalDual
from ceu.schedule import decay_parameter_names, lr_factor, micro_batch_plan, parameter_groups, training_schedule
from ceu.train import unlearn
from helpers import qa_samples, tiny_model

transformers = pytest.importorskip("transformers")

# 7 forget samples in micro-batches of 2: 4 micro-batches an epoch, the last with one sample; windows of 3 leave a
# partial window of 1 at each epoch's end (2 steps an epoch); 2.5 epochs stop after 5 steps, mid-epoch; the LR warms
# up over ⌈0.4 · 5⌉ = 2 steps, λ is held for 1 epoch = 2 steps.
RAGGED = dict(epochs=2.5, lr=1e-2, batch_size=2, grad_accum_steps=3, lr_warmup_ratio=0.4, lr_schedule="linear",
              dual_warmup_epochs=1.0, lambda_init=1.0, dual_lr=2.0, epsilon=0.0, progress=False, log_every=1)


def test_schedule_definitions_on_a_ragged_run():
    schedule = training_schedule(7, UnlearnConfig(**RAGGED))
    assert (schedule.micro_batches_per_epoch, schedule.steps_per_epoch, schedule.total_steps) == (4, 2, 5)
    assert (schedule.lr_warmup_steps, schedule.dual_warmup_steps) == (2, 2)
    # per-epoch windows, each epoch ending on a partial one, none straddling two epochs
    assert [list(w) for w in schedule.windows()] == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9, 10]]
    assert [schedule.lr_factor(k) for k in range(5)] == pytest.approx([0.0, 0.5, 1.0, 2 / 3, 1 / 3])
    assert [schedule.lambda_held(k) for k in range(1, 6)] == [True, True, False, False, False]
    # a ratio of 1 warms up over the whole run; 0.1 · 30 is 3 steps, not 4
    assert training_schedule(7, UnlearnConfig(**{**RAGGED, "lr_warmup_ratio": 1.0})).lr_warmup_steps == 5
    assert training_schedule(30, UnlearnConfig(epochs=1, batch_size=1, lr_warmup_ratio=0.1)).lr_warmup_steps == 3
    # two ranks: global micro-batches of 4
    assert training_schedule(7, UnlearnConfig(**RAGGED), world_size=2).micro_batches_per_epoch == 2



def test_issue_16_cases_tofu_forget10_and_forget01_with_accumulation():
    """Global micro-batches of 32 in windows of 4, 10 epochs, 5 of dual warm-up: TOFU's forget10 (400 samples) is 13
    micro-batches an epoch, 4 steps (the old straddling windows made 33 steps in all, Trainer 40); forget01 (40) is 2
    micro-batches, one partial window an epoch (the old count held λ for all 5 of its steps)."""
    config = UnlearnConfig(batch_size=32, grad_accum_steps=4, epochs=10, dual_warmup_epochs=5)
    forget10, forget01 = training_schedule(400, config), training_schedule(40, config)
    assert (forget10.steps_per_epoch, forget10.total_steps, forget10.dual_warmup_steps) == (4, 40, 20)
    assert (forget01.steps_per_epoch, forget01.total_steps, forget01.dual_warmup_steps) == (1, 10, 5)
    assert [len(window) for window in forget01.windows()] == [2] * 10

def test_lr_factor_is_transformers_schedules():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    for make, kind in ((get_linear_schedule_with_warmup, "linear"), (get_cosine_schedule_with_warmup, "cosine")):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make(optimizer, 3, 11)
        theirs = []
        for _ in range(11):
            theirs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        assert [lr_factor(k, 11, 3, kind) for k in range(11)] == pytest.approx(theirs, abs=1e-12)


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_both_loops_run_the_same_schedule(tmp_path, monkeypatch):
    """Accumulation with a partial window, LR warm-up, dual warm-up and a forget set that does not divide evenly: the
    same optimizer steps, micro-batches per step, LR at every step, steps with λ held, and weight-decay groups."""
    from ceu.hf import PrimalDualTrainer, unlearn_with_trainer

    windows = []  # micro-batches each optimizer step accumulated, in the order the loops ran them
    original_step = PrimalDual.step

    def counting_step(self):
        windows.append(self._window_count)
        original_step(self)

    monkeypatch.setattr(PrimalDual, "step", counting_step)
    forget, retain = qa_samples(7), qa_samples(5, seed=1)
    schedule = training_schedule(len(forget), UnlearnConfig(**RAGGED))
    runs = {}
    for name, run in (("ceu", unlearn), ("hf", unlearn_with_trainer)):
        windows.clear()
        config = UnlearnConfig(**RAGGED, log_path=str(tmp_path / f"{name}.jsonl"))
        extra = {"output_dir": tmp_path / "trainer"} if name == "hf" else {}
        result = run(tiny_model(), forget, retain, config, **extra)
        runs[name] = result, list(windows), read_log(tmp_path / f"{name}.jsonl")

    expected_lrs = [RAGGED["lr"] * schedule.lr_factor(k) for k in range(schedule.total_steps)]
    expected_held = [schedule.lambda_held(k) for k in range(1, schedule.total_steps + 1)]
    for name, (result, accumulated, log) in runs.items():
        assert result.steps == len(log) == schedule.total_steps == 5, name
        assert accumulated == [3, 1, 3, 1, 3], name
        assert [line["step"] for line in log] == [1, 2, 3, 4, 5], name
        assert [line["lr"] for line in log] == pytest.approx(expected_lrs, abs=1e-12), name
        assert [line["dual_warmup"] for line in log] == expected_held, name
        lambdas = [line["lambda"] for line in log]
        assert lambdas[:2] == [1.0, 1.0] and all(lam > 1.0 for lam in lambdas[2:]), name
    assert [line["epoch"] for line in runs["ceu"][2]] == [line["epoch"] for line in runs["hf"][2]]

    # Weight decay: the Trainer's optimizer groups are the slim loop's (biases and norm weights exempt).
    for kind in ("llama", "phi", "gpt2"):
        model = tiny_model(kind)
        trainer = PrimalDualTrainer(model=model, args=transformers.TrainingArguments(
            output_dir=str(tmp_path / "groups"), weight_decay=0.1, use_cpu=True, report_to=[]))
        trainer.create_optimizer()

        def by_decay(groups):
            return {group["weight_decay"]: {id(p) for p in group["params"]} for group in groups if group["params"]}

        assert by_decay(trainer.optimizer.param_groups) == by_decay(parameter_groups(model, 0.1)), kind
        exempt = {name for name, _ in model.named_parameters()} - decay_parameter_names(model)
        assert exempt and all("bias" in name or "norm" in name or "ln_" in name for name in exempt), kind
        # and the rule is stock Trainer's own (whose list also names a tied head under its second name)
        stock = transformers.Trainer(model=model, args=transformers.TrainingArguments(
            output_dir=str(tmp_path / "stock"), use_cpu=True, report_to=[]))
        names = {name for name, _ in model.named_parameters()}
        assert set(stock.get_decay_parameter_names(model)) & names == decay_parameter_names(model), kind


def test_trainer_refuses_arguments_that_would_run_another_schedule(tmp_path):
    from ceu.hf import PrimalDualTrainer

    def args(**settings):
        return transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **settings)

    with pytest.raises(ValueError, match="lr_schedule is 'linear'"):
        PrimalDualTrainer(model=tiny_model(), args=args(lr_scheduler_type="cosine"))
    with pytest.raises(ValueError, match="lr_warmup_ratio"):
        PrimalDualTrainer(model=tiny_model(), args=args(warmup_steps=0.1))
    with pytest.raises(ValueError, match="max_steps"):
        PrimalDualTrainer(model=tiny_model(), args=args(max_steps=3))
    PrimalDualTrainer(model=tiny_model(), args=args(lr_scheduler_type="cosine"),
                      unlearn_config=UnlearnConfig(lr_schedule="cosine"))


def test_micro_batch_plan_is_seeded_and_covers_each_epoch():
    config = UnlearnConfig(epochs=2, batch_size=3, seed=7)
    plan = list(micro_batch_plan(7, 4, config))
    assert plan == list(micro_batch_plan(7, 4, config))
    assert len(plan) == len(micro_batch_plan(7, 4, config)) == 6
    for epoch in (plan[:3], plan[3:]):
        assert sorted(i for forget, _ in epoch for i in forget) == list(range(7))
    assert all(len(forget) == len(retain) for forget, retain in plan)
    assert plan != list(micro_batch_plan(7, 4, UnlearnConfig(epochs=2, batch_size=3, seed=8)))
    # the retain side: shuffled passes over the 4 retain samples, back to back across forget batches and epochs
    retain_stream = [i for _, retain in plan for i in retain]
    for start in range(0, 12, 4):
        assert sorted(retain_stream[start:start + 4]) == [0, 1, 2, 3]


def test_micro_batch_plan_is_pinned():
    """The seeded order itself, as the plan built up front (before it was lazy) drew it: changing it would change every
    run's data order."""
    plan = list(micro_batch_plan(5, 3, UnlearnConfig(epochs=1.5, batch_size=2, seed=3)))
    assert plan == PINNED_PLAN


PINNED_PLAN = [([1, 0], [1, 0]), ([3, 4], [2, 0]), ([2], [2]), ([1, 4], [1, 2]), ([3, 0], [0, 1]), ([2], [0])]


@settings(max_examples=150, deadline=None)
@given(n_forget=st.integers(1, 13), n_retain=st.integers(1, 9), batch_size=st.integers(1, 5),
       accumulation=st.integers(1, 4), epochs=st.sampled_from([0.2, 1, 1.5, 2.5, 3]), world_size=st.integers(1, 3),
       start=st.integers(0, 40))
def test_optimizer_steps_from_any_step_are_the_tail_of_the_whole_plan(n_forget, n_retain, batch_size, accumulation,
                                                                      epochs, world_size, start):
    """Property: the plan grouped per optimizer step is the plan cut by Schedule.windows(), and a resumed run starting
    at step ``start`` gets exactly the steps an uninterrupted run gets from there."""
    config = UnlearnConfig(epochs=epochs, batch_size=batch_size, grad_accum_steps=accumulation)
    plan = micro_batch_plan(n_forget, n_retain, config, world_size)
    flat = list(plan)
    whole = list(plan.optimizer_steps())
    assert whole == [[flat[index] for index in window] for window in plan.schedule.windows()]
    assert len(whole) == plan.schedule.total_steps
    assert list(plan.optimizer_steps(start)) == whole[start:]


def test_a_huge_number_of_epochs_is_planned_lazily():
    """10¹² epochs: the first steps (and a resume at step 10⁴) come at once, in a few kB; a plan built up front
    would need ~10¹² entries before step one."""
    config = UnlearnConfig(epochs=1e12, batch_size=2, grad_accum_steps=2)
    plan = micro_batch_plan(5, 3, config)
    assert plan.schedule.total_steps == 2 * 10 ** 12
    tracemalloc.start()
    steps = plan.optimizer_steps(start=10 ** 4)
    first = [next(steps) for _ in range(3)]
    windows = plan.schedule.windows()
    assert [list(next(windows)) for _ in range(3)] == [[0, 1], [2], [3, 4]]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 256 * 1024, peak
    small = micro_batch_plan(5, 3, UnlearnConfig(epochs=5002, batch_size=2, grad_accum_steps=2))
    assert first == list(small.optimizer_steps(start=10 ** 4))[:3]


def test_lr_factor_warms_up_from_zero():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6)] == pytest.approx([0.0, 0.5, 1.0, 0.5])
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0
