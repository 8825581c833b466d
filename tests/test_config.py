"""ceu.config: UnlearnConfig's validation (hostile values refused at construction, naming the field), and the module
importing without torch."""
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ceu.config import ConfigError, UnlearnConfig
from ceu.primal_dual import PrimalDual
from ceu.schedule import training_schedule


def test_checkpoint_every_needs_a_directory():
    with pytest.raises(ValueError, match="checkpoint_dir"):
        UnlearnConfig(checkpoint_every=2)


def test_config_module_imports_without_torch():
    """ceu/config.py on its own, with torch made unimportable."""
    path = Path(__file__).resolve().parents[1] / "ceu" / "config.py"
    code = ("import sys, importlib.util; sys.modules['torch'] = None; "
            f"spec = importlib.util.spec_from_file_location('config', {str(path)!r}); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "print(module.UnlearnConfig().epochs)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "10.0"


# Hostile settings (issue 12): every invalid value is refused when the config is built, by a ConfigError naming the
# field; a value it accepts never fails deeper inside (the schedule is built from it below).
NUMERIC = [spec.name for spec in fields(UnlearnConfig)
           if {int, float} & set(getattr(spec.type, "__args__", (spec.type,)))]


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10 ** 400])
def test_non_finite_numbers_are_refused_naming_the_field(name, value):
    with pytest.raises(ConfigError, match=f"^{name} must be (finite|an integer)") as error:
        UnlearnConfig(**{name: value})
    assert error.value.field == name


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", ["1", True, [1], 1j])
def test_non_numbers_are_refused_naming_the_field(name, value):
    with pytest.raises(ConfigError, match=f"^{name} must be (a number|an integer), got"):
        UnlearnConfig(**{name: value})


@pytest.mark.parametrize("name, value, message", [
    ("epochs", 0, "must be > 0"), ("epochs", -1.0, "must be > 0"), ("lr", -1e-5, "must be >= 0"),
    ("weight_decay", -0.01, "must be >= 0"), ("lr_warmup_ratio", 1.0001, r"must be in \[0, 1\]"),
    ("lr_warmup_ratio", -0.1, r"must be in \[0, 1\]"), ("max_grad_norm", -1.0, "gradient ascent"),
    ("max_grad_norm", 0.0, "must be > 0"), ("lambda_init", -1.0, "must be >= 0"), ("dual_lr", -5.0, "must be >= 0"),
    ("epsilon", -0.3, "never negative"), ("epsilon_alpha", -0.5, "must be >= 0"),
    ("dual_warmup_epochs", -1.0, "must be >= 0"), ("forget_weight", -1.0, "train on the forget set"),
    ("batch_size", 0, "must be >= 1"), ("grad_accum_steps", 0, "must be >= 1"), ("log_every", 0, "must be >= 1"),
    ("checkpoint_every", -1, "must be >= 0"), ("seed", -1, r"must be in \[0,"),
    ("batch_size", 2.0, "must be an integer"), ("seed", 1.5, "must be an integer"),
    ("progress", "no", "must be True or False"), ("deterministic", 1, "must be True or False"),
    ("log_path", 3, "must be a string"), ("lr_schedule", "step", "must be one of"), ("epochs", None, "must be set"),
])
def test_out_of_range_values_are_refused_naming_the_field(name, value, message):
    with pytest.raises(ConfigError, match=f"^{name} .*{message}") as error:
        UnlearnConfig(**{name: value})
    assert error.value.field == name


def test_boundary_values_are_accepted():
    UnlearnConfig(lr=0.0, weight_decay=0.0, lr_warmup_ratio=1.0, lambda_init=0.0, dual_lr=0.0, epsilon=0.0,
                  epsilon_alpha=0.0, dual_warmup_epochs=0.0, max_grad_norm=None, epochs=1e-9, seed=0)
    UnlearnConfig(lr_warmup_ratio=0.0, batch_size=1, epochs=10 ** 12)


FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10 ** 6)


@settings(max_examples=300, deadline=None)
@given(epochs=FLOATS, ratio=FLOATS, dual_warmup=FLOATS, batch_size=st.integers(-2, 9),
       accumulation=st.integers(-2, 9), n_forget=st.integers(1, 50))
def test_a_config_is_refused_up_front_or_its_schedule_builds(epochs, ratio, dual_warmup, batch_size, accumulation,
                                                             n_forget):
    """Property: a config either fails at construction with a ConfigError (naming a field it was given) or its
    schedule builds: never ``cannot convert float NaN to integer`` or an error about ``warmup_steps``."""
    given_names = {"epochs", "lr_warmup_ratio", "dual_warmup_epochs", "batch_size", "grad_accum_steps"}
    try:
        config = UnlearnConfig(epochs=epochs, lr_warmup_ratio=ratio, dual_warmup_epochs=dual_warmup,
                               batch_size=batch_size, grad_accum_steps=accumulation)
    except ConfigError as error:
        assert error.field in given_names
        return
    schedule = training_schedule(n_forget, config)
    assert schedule.total_steps >= 1 and 0 <= schedule.lr_warmup_steps <= schedule.total_steps
    PrimalDual(config.lambda_init, config.dual_lr, config.epsilon, warmup_steps=schedule.dual_warmup_steps)
