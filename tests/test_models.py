"""ceu.models: what a model argument names (hub name, model folder, GGUF file, folder holding one GGUF file), the
errors for paths that do not exist or are ambiguous, and saving a dequantised model that transformers marks as
quantised. The real GGUF checkpoint itself: tests/test_real_model.py."""
import pytest
import torch

from ceu.models import drop_quantization_marker, load_model, resolve
from helpers import tiny_model

transformers = pytest.importorskip("transformers")


def test_resolve_names_each_kind_of_source(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model.Q4_1.gguf").write_bytes(b"")
    assert resolve(tmp_path / "hf") == (str(tmp_path / "hf"), None)
    assert resolve(tmp_path / "gguf") == (str(tmp_path / "gguf"), "model.Q4_1.gguf")
    assert resolve(tmp_path / "gguf" / "model.Q4_1.gguf") == (str(tmp_path / "gguf"), "model.Q4_1.gguf")
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert resolve("gpt2") == ("gpt2", None)


@pytest.mark.parametrize("name", ["missing", "missing/model.gguf", "./runs/model", "/no/such/folder"])
def test_a_missing_path_is_named_not_tried_on_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    source = str(tmp_path / name) if name == "missing" else name
    with pytest.raises(FileNotFoundError, match=f"no such model file or folder: {source}"):
        resolve(source)


def test_ambiguous_or_empty_folders_and_other_files_are_refused(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\): name the one"):
        resolve(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a config.json .* nor a .gguf file"):
        resolve(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin is a file but not a .gguf"):
        resolve(tmp_path / "weights.bin")


def test_load_model_reads_a_saved_folder(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert not loaded.training
    for (name, expected), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(got, expected), name


def _marked_as_gguf(model):
    """The state transformers leaves a dequantised GGUF model in: its quantiser attached, the config marked."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    quantizer = GgufHfQuantizer(GgufConfig())
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def test_a_dequantised_model_marked_as_quantised_saves_after_the_marker_is_dropped(tmp_path):
    model = _marked_as_gguf(tiny_model())
    with pytest.raises(ValueError, match="not serializable"):  # what transformers does: the bug being fixed
        model.save_pretrained(tmp_path / "refused")
    drop_quantization_marker(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
    loaded = load_model(tmp_path / "saved")
    for (name, expected), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(got, expected), name


def test_a_model_still_holding_integer_weights_is_not_unmarked():
    model = _marked_as_gguf(tiny_model())
    model.model.layers[0].mlp.register_buffer("qweight", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"still holds quantised \(non-float\) weights, e.g. .*qweight"):
        drop_quantization_marker(model)
    assert model.hf_quantizer is not None
