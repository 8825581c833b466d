"""ceu.config: UnlearnConfig's validation, and the module importing without torch."""
import subprocess
import sys
from pathlib import Path

import pytest

from ceu.config import UnlearnConfig


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
