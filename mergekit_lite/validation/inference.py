"""Running models on a fixed batch with transformers (and peft for adapters applied at inference time).

Only the forward check imports this module, and it imports transformers and peft only when called, so
neither is needed to merge. Every model runs in float32 on the validation device: 16-bit weights upcast
exactly, so differences between two models' logits come from their weights, not from 16-bit activations.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

# Plain text of two kinds (prose, code), so the loss reflects ordinary use. The batch is small on purpose: every
# weight of every layer takes part in every token, so a few dozen tokens prove as much as thousands (the tensors
# load, the logits are finite, a merge that must equal its input does); the cost of the check is proportional to
# tokens x parameters x models. Only the loss, a sanity figure beside the inputs', is noisier.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
)
FIXED_SHAPE = (2, 16)       # the batch of token ids used when no usable tokenizer is found
MAX_TOKENS = 32
MAX_UNKNOWN = 0.5           # a tokenizer that maps more of the prompts than this to <unk> is not used


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor         # (batch, seq) int64
    attention_mask: torch.Tensor    # (batch, seq) int64, 0 on padding
    source: str                     # "tokenizer" or "fixed_ids"

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def make_batch(tokenizer_folder: str, vocab_size: int, avoid: Sequence[int] = ()) -> Batch:
    """The prompts through the output's tokenizer when it loads and knows them; else fixed token ids, none of
    them in ``avoid`` (a VLM's image token would ask for image features a text-only batch does not have)."""
    batch = _tokenized(tokenizer_folder, vocab_size)
    if batch is not None:
        return batch
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, FIXED_SHAPE, generator=generator)
    allowed = next((i for i in range(vocab_size) if i not in avoid), 0)
    ids[torch.isin(ids, torch.tensor(list(avoid), dtype=ids.dtype))] = allowed
    return Batch(ids, torch.ones_like(ids), "fixed_ids")


def _tokenized(folder: str, vocab_size: int) -> Optional[Batch]:
    try:
        from transformers import AutoTokenizer

        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:   # no tokenizer files, or one transformers cannot build: fall back to fixed ids
        return None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        return None
    encoded = tokenizer(list(PROMPTS), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    real = ids[mask.bool()]
    if real.numel() == 0:   # a tokenizer that cannot encode plain English: use fixed ids instead
        return None
    unknown = tokenizer.unk_token_id
    if int(ids.max()) >= vocab_size or (unknown is not None and float((real == unknown).float().mean()) > MAX_UNKNOWN):
        return None
    return Batch(ids.long(), mask.long(), "tokenizer")


class IncompleteModel(RuntimeError):
    """transformers could not fill a tensor of the model from the files."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor


# Whether the forward check may run a model's own code (config.json's auto_map): set by run_merge for its own
# validation when the user gave trust_remote_code (--trust-remote-code); never otherwise.
TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_remote_code", default=False)


class PickleRefused(RuntimeError):
    """The weights are pickle files only and --allow-pickle was not given: nothing was unpickled."""


def load_model(folder: str, device: torch.device, adapters: Sequence[tuple[str, float]] = (), *,
               allow_pickle: bool = False):
    """A causal LM (a VLM: its image-text-to-text model, see auto_class) from ``folder`` in float32 on ``device``,
    with LoRA ``adapters`` (folder, weight) applied at inference time by peft: not merged into the weights, so it
    is the reference a fold must reproduce.

    Weights are read from safetensors files whenever the folder has them. A folder (or adapter) with pickle
    weights only raises PickleRefused unless ``allow_pickle``; with it, every pickle file is first opened by
    our own torch.load(weights_only=True) reader (a ModelError if it asks for code) and transformers is asked
    for weights_only too. Raises IncompleteModel naming a tensor transformers could not fill (it would
    otherwise initialise it randomly with only a warning)."""
    import transformers

    safetensors = _model_weights_are_safe(folder, allow_pickle)
    for adapter, _ in adapters:
        _adapter_weights_are_safe(adapter, allow_pickle)
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    options = {dtype_key: torch.float32, "use_safetensors": safetensors, "trust_remote_code": TRUST_REMOTE_CODE.get()}
    if "weights_only" in inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters:
        options["weights_only"] = True
    with _quiet():
        model, info = auto_class(_config_of(folder)).from_pretrained(folder, output_loading_info=True,
                                                                     ignore_mismatched_sizes=True,  # reported below
                                                                     **options)
    problems = [(name, "is missing") for name in sorted(info.get("missing_keys", ()))]
    problems += [(name, f"has shape {list(stored)} in the files, the model built from config.json needs "
                        f"{list(wanted)}") for name, stored, wanted in sorted(info.get("mismatched_keys", ()))]
    refuse_incomplete(problems)
    if adapters:
        model = apply_adapters(model, adapters)
    return model.to(device).eval()


def refuse_incomplete(problems: Sequence[tuple[str, str]]) -> None:
    """IncompleteModel naming the first of (tensor, what is wrong) and how many more there are."""
    if problems:
        name, what = problems[0]
        more = f" ({len(problems) - 1} more tensors too)" if len(problems) > 1 else ""
        raise IncompleteModel(f"{what}{more}: transformers would initialise it randomly", name)


def pickle_files(folder: str, names: Optional[Sequence[str]] = None) -> list[str]:
    """The pickle weight files of ``folder`` (those of ``names`` when given) when it has no safetensors ones."""
    from ..sources.checkpoint import PICKLE_SUFFIXES

    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in present):
        return []
    return [name for name in present if (name in names if names is not None else name.endswith(PICKLE_SUFFIXES))]


def refusal(files: Sequence[str], what: str = "weights") -> str:
    return (f"the only {what} are pickle files ({', '.join(files[:3])}), which can run code when loaded; pass "
            "--allow-pickle to load them with torch.load(weights_only=True)")


def _model_weights_are_safe(folder: str, allow_pickle: bool) -> bool:
    """True: load safetensors only. False: pickles only, vetted. Raises PickleRefused or ModelError."""
    pickles = pickle_files(folder)
    if not pickles:
        return True
    if not allow_pickle:
        raise PickleRefused(refusal(pickles))
    from ..sources.opener import open_checkpoint

    open_checkpoint(folder, allow_pickle=True).close()   # torch.load(weights_only=True) of every file
    return False


def _adapter_weights_are_safe(folder: str, allow_pickle: bool) -> None:
    from ..lora.adapter import PICKLE_FILES, open_adapter

    pickles = pickle_files(folder, PICKLE_FILES)
    if pickles and not allow_pickle:
        raise PickleRefused(refusal(pickles, "adapter weights"))
    if pickles:
        open_adapter(folder, folder, allow_pickle=True).close()


def unknown_architecture(config: dict) -> Optional[str]:
    """Why transformers cannot build a model that computes next-token logits from this config.json: a causal
    LM, or an image-text-to-text model run on text only (None: it can)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return "config.json has no model_type: transformers cannot tell which model to build"
    if model_type not in CONFIG_MAPPING_NAMES:
        return f"transformers {transformers.__version__} does not know model_type '{model_type}'"
    if _auto_class_name(model_type) is None:
        return (f"transformers {transformers.__version__} has no causal language model nor image-text-to-text model "
                f"for model_type '{model_type}'")
    return None


def auto_class(config: dict):
    """transformers' auto class for this config.json: causal LM first, else image-text-to-text (a VLM such as
    LLaVA, run here on text-only input_ids)."""
    import transformers

    return getattr(transformers, _auto_class_name(config.get("model_type")) or "AutoModelForCausalLM")


def _auto_class_name(model_type: object) -> Optional[str]:
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping, name in (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
                          ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
                          ("MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES", "AutoModelForVision2Seq")):   # transformers 4
        if model_type in getattr(modeling_auto, mapping, {}) and hasattr(transformers, name):
            return name
    return None


def _config_of(folder: str) -> dict:
    """config.json of ``folder`` ({} when it cannot be read: transformers then says why it cannot load)."""
    from ..sources.user_files import parse_json_file

    try:
        config = parse_json_file(os.path.join(folder, "config.json"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def apply_adapters(model, adapters: Sequence[tuple[str, float]], *, low_cpu_mem_usage: bool = False):
    """Wrap ``model`` with peft so the adapters run beside the base weights, each scaled by its weight.

    peft computes base(x) + sum_i scaling_i * B_i(A_i(x)) with scaling_i = alpha_i / r_i (or / sqrt(r_i));
    multiplying scaling_i by weight_i gives W + sum_i weight_i * scaling_i * B_i A_i, a weighted fold.
    ``low_cpu_mem_usage``: for a skeleton whose base weights are on ``meta`` (streamed.py); peft then makes the
    adapter's layers empty and assigns the weights it reads, so they are real while the base stays empty."""
    from peft import PeftModel

    names = [f"adapter{i}" for i in range(len(adapters))]
    with _quiet(), _adapters_stay_put(low_cpu_mem_usage):
        wrapped = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0],
                                            low_cpu_mem_usage=low_cpu_mem_usage)
        for name, (folder, _) in zip(names[1:], adapters[1:]):
            wrapped.load_adapter(folder, adapter_name=name, low_cpu_mem_usage=low_cpu_mem_usage)
    wrapped.base_model.set_adapter(names)
    for module in wrapped.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, (_, weight) in zip(names, adapters):
                if name in scaling:
                    scaling[name] *= weight
    return wrapped


@contextlib.contextmanager
def _adapters_stay_put(enabled: bool) -> Iterator[None]:
    """peft moves the adapter weights it read to the device of the base layer's weight; on a skeleton that is
    ``meta``, which would drop them. While loading into a skeleton the adapter weights stay where peft read them
    (the CPU; streamed.py moves nothing, the LoRA layers are small and run where their input is)."""
    if not enabled:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    move = BaseTunerLayer._move_adapter_to_device_of_base_layer
    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move


def logits_of(model, batch: Batch, device: torch.device) -> torch.Tensor:
    """(batch, seq, vocab) float32 logits, on the CPU."""
    with torch.inference_mode():
        out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return out.logits.float().cpu()


def batch_loss(logits: torch.Tensor, batch: Batch) -> float:
    """Mean next-token cross-entropy over the real (non-padding) tokens, in nats."""
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' and peft's progress bars and load chatter would bury the report."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    previous = logging.getLogger("peft").level
    logging.getLogger("peft").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        logging.getLogger("peft").setLevel(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
