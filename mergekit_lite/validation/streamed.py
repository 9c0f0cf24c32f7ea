"""Running a model without holding it: its skeleton has no weights, and each module's tensors are read when it runs.

The forward check runs every model (the merged one and each input) on one small batch. Loading a model whole in
float32 needs four bytes per parameter, and each model's pass needs each weight exactly once, so here:

- the model is built from its config.json by transformers with every parameter on the ``meta`` device (no
  memory; buffers such as rotary frequencies are computed as usual, they are small and not in the files);
- every module that owns parameters gets a forward pre-hook that reads exactly its tensors from the safetensors
  files (``sources.Checkpoint.read``: positional reads, nothing memory-mapped), upcasts them to float32 on the
  validation device, and a forward hook that puts the empty ``meta`` parameters back, freeing them.

So memory holds one module's weights (at most the largest tensor in float32, or a layer's stacked experts, which
streamed_model weighs against its ``limit``, else one expert's slice of them: experts.py) plus the activations of
the batch, whatever the model's size; when it has a core of its own, a background thread reads the next group of
modules (the next decoder layer) while the current one computes (``Prefetch``), which adds one group's weights. A
tied ``lm_head`` is the embedding's Parameter in the skeleton, so its module reads the embedding's tensor again
when it runs. Adapters applied at inference time are peft's, as in
``inference.apply_adapters``: peft wraps the skeleton, reads the (small) adapter weights for real, and only the
base weights stream. accelerate's ``AlignDevicesHook`` with an ``OffloadedWeightsLoader`` does much the same,
but it memory-maps the files through safetensors, keeps the stored dtype and is not a dependency of the
``validate`` extra; this hook is twenty lines.

Tensors stored under other names than the modules' stream under the names transformers renames them to, and
per-expert MoE tensors are stacked as transformers stacks them, when their layer runs (renames.py). A model that
transformers converts otherwise, or one of whose experts would exceed the memory bound, cannot stream:
``streamed_model`` returns None and the caller loads it whole.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ..units import format_size
from .experts import lazy_stacks, read_by_expert
from .renames import Fused, loaded_names
from .stream import Staging, fill_weight


class TooLargeWhole(RuntimeError):
    """A model that cannot stream (streamed.py) and would need more than the memory bound to load whole."""


def open_model(folder: str, device: torch.device, adapters: Sequence[tuple[str, float]] = (), *,
               allow_pickle: bool = False, whole_limit: Optional[int] = None, tally=None):
    """The model of ``folder`` ready to run in float32 on ``device``: streamed module by module (streamed.py)
    when its safetensors names are its modules', else loaded whole by ``load_model`` when that needs at most
    ``whole_limit`` bytes (from the tensors' sizes: free memory is never asked), else TooLargeWhole. ``tally``
    (finite.FiniteTally): NaN and Inf counted in each tensor read from the files, when the model streams."""
    from .inference import _adapter_weights_are_safe, load_model, pickle_files

    for adapter, _ in adapters:
        _adapter_weights_are_safe(adapter, allow_pickle)   # before peft reads any adapter file
    pickled = bool(pickle_files(folder))
    if not pickled:
        model = streamed_model(folder, device, adapters, tally=tally, limit=whole_limit)
        if model is not None:
            return model
    need = 4 * _stored_values(folder)
    if whole_limit is not None and need > whole_limit:
        why = ("its weights are pickle files" if pickled else "transformers converts its stored tensors while "
               "loading (beyond renaming them, or into stacked experts each larger than the bound below)")
        raise TooLargeWhole(f"{why}, so it cannot run layer by layer, and loading it whole in float32 needs about "
                            f"{format_size(need)}, more than the merge's memory bound ({format_size(whole_limit)})")
    return load_model(folder, device, adapters, allow_pickle=allow_pickle)


def _stored_values(folder: str) -> int:
    """Values in the folder's weights: from the safetensors headers, else pickle sizes (>= 2 bytes a value)."""
    from ..sources.opener import open_checkpoint
    from .inference import pickle_files

    pickles = pickle_files(folder)
    if pickles:
        return sum(os.path.getsize(os.path.join(folder, name)) // 2 for name in pickles)
    checkpoint = open_checkpoint(folder)
    checkpoint.close()
    return sum(info.numel for info in checkpoint.tensors.values())


PEFT_PREFIX = "base_model.model."   # peft's wrapper in front of the base model's parameter names


@dataclass
class Streaming:
    """Bytes of parameters read by the hooks and held now, and the most held at once (the memory bound); tensors
    read, and the weight buffers allocated for them (the others reused a freed module's: ``Recycled``)."""
    live: int = 0
    peak: int = 0
    reads: int = 0
    allocated: int = 0

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.reads += 1
        self.peak = max(self.peak, self.live)


def streamed_model(folder: str, device: torch.device, adapters: Sequence[tuple[str, float]] = (), *, checkpoint=None,
                   tally=None, dtype: torch.dtype = torch.float32, limit: Optional[int] = None):
    """The model of ``folder`` (a causal LM, or a VLM's image-text-to-text model) ready to run in float32 on
    ``device`` with its weights read module by module, with ``adapters`` applied by peft at inference time;
    ``model.streaming`` counts the bytes held. None when transformers converts the files' tensors otherwise than
    by the renames and stacks of renames.py, or one expert would exceed ``limit`` (then load it whole). Raises
    inference.IncompleteModel naming a tensor the files lack or hold with another shape.
    ``checkpoint``: read the tensors from it (``tensors``, ``read``, ``close``, as sources.Checkpoint) rather than
    from the folder's files (moe_forward.SwappedMLPs). ``dtype``: the floating-point weights' dtype while they run
    (float32 for the checks; `merge moe` runs its base in bfloat16 for hidden-state routers, as mergekit-moe).
    ``limit``: the bytes a module of stacked experts may hold, else it is read expert by expert (experts.py);
    None: no limit."""
    from ..sources.opener import open_checkpoint
    from .inference import apply_adapters, refuse_incomplete

    checkpoint = checkpoint if checkpoint is not None else open_checkpoint(folder)
    model = _skeleton(folder, dtype)
    stored_as_named = all(name in checkpoint.tensors for name, _ in model.named_parameters())
    renamed = {} if stored_as_named else loaded_names(model, checkpoint.tensors)   # 50 ms for transformers' rules
    if adapters:
        model = apply_adapters(model, adapters, low_cpu_mem_usage=True)
    names, missing = _file_names(model, checkpoint.tensors, renamed)
    used = {stored for source in names.values() for stored in _stored_names(source)}
    lazy = lazy_stacks(model, names, limit, 2 if reads_ahead(device) else 1)   # 2: the next layer is read ahead
    if (missing and set(checkpoint.tensors) - used) or lazy is None or (lazy and adapters):
        checkpoint.close()
        return None   # tensors transformers converts otherwise while loading, or too large an expert: load it whole
    shapes = {id(param): tuple(param.shape) for param in model.parameters()}
    problems = [(name, "is missing") for name in sorted(missing)]
    plain = {key: name for key, name in names.items() if isinstance(name, str)}   # a Fused one's shape is checked
    for key, name in sorted(plain.items(), key=lambda item: item[1]):
        stored = list(checkpoint.tensors[name].shape)
        if tuple(stored) != shapes[key]:
            problems.append((name, f"has shape {stored} in the files, the model built from config.json needs "
                                   f"{list(shapes[key])}"))
    if problems:
        checkpoint.close()
        refuse_incomplete(problems)
    model.streaming = Streaming()
    recycled = _hook_modules(model, {k: v for k, v in names.items() if k not in lazy}, checkpoint, device,
                             model.streaming, tally, dtype)
    if lazy:
        read_by_expert(model, lazy, checkpoint, device, tally, dtype, model.streaming, recycled.also)
    _move_buffers(model, device)
    return model.eval()


def _skeleton(folder: str, dtype: torch.dtype = torch.float32):
    """The model built from config.json in ``dtype``, every parameter on ``meta`` (buffers are real)."""
    import transformers

    from .inference import TRUST_REMOTE_CODE, _config_of, _quiet, auto_class

    trust = TRUST_REMOTE_CODE.get()
    with _quiet():
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust)
        with _parameters_on_meta():
            model = auto_class(_config_of(folder)).from_config(config, trust_remote_code=trust, dtype=dtype)
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered while inside is replaced by an empty one on ``meta``: no memory, no init cost
    (transformers' and torch's initialisers then run on meta tensors). Buffers stay where they are made."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: Optional[torch.nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _file_names(model: torch.nn.Module, tensors: dict,
                renamed: Optional[dict] = None) -> tuple[dict[int, Union[str, Fused]], list[str]]:
    """({id(parameter): its tensor name in the files, or the Fused ones it is built from}, names of empty
    parameters the files do not hold). A tied parameter has several names (lm_head.weight and the embedding's):
    whichever the files hold is read. ``renamed``: renames.loaded_names."""
    names: dict[int, Union[str, Fused]] = {}
    unnamed: dict[int, str] = {}
    for full, param in model.named_parameters(remove_duplicate=False):
        if param.device.type != "meta":
            continue   # real already: an adapter's weights
        name = _base_name(full)
        source = (renamed or {}).get(name, name) if name not in tensors else name
        if isinstance(source, Fused) or source in tensors:
            names.setdefault(id(param), source)
        else:
            unnamed.setdefault(id(param), name)
    return names, [name for key, name in unnamed.items() if key not in names]


def _stored_names(source: Union[str, Fused]) -> list[str]:
    return source.names if isinstance(source, Fused) else [source]


def _base_name(name: str) -> str:
    """A parameter's name in the base model's files: without peft's wrapper (``base_model.model.``,
    ``.base_layer``)."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def _hook_modules(model: torch.nn.Module, names: dict[int, str], checkpoint, device: torch.device,
                  streaming: Streaming, tally=None, dtype: torch.dtype = torch.float32) -> "Recycled":
    """A peft layer (DoRA) reads its base layer's weight in its own forward, before calling the base layer: the
    weights of a ``base_layer`` are loaded around its peft wrapper's forward. Reads run ahead (``Prefetch``).
    Returns the layers' recycled weights, given back before the weights outside the layers and after a pass."""
    wrappers = {id(getattr(module, "base_layer")): module for module in model.modules()
                if isinstance(getattr(module, "base_layer", None), torch.nn.Module)}
    owners = []
    for path, module in model.named_modules():
        owned = {key: param for key, param in module._parameters.items() if param is not None and id(param) in names}
        if owned:
            owners.append((path, module, owned))
    prefetch = Prefetch(owners, names, checkpoint, device, tally, Recycled(streaming), dtype)
    weakref.finalize(model, prefetch.close)
    for _, module, owned in owners:
        runs = wrappers.get(id(module), module)
        runs.register_forward_pre_hook(_loader(module, owned, prefetch, streaming))
        runs.register_forward_hook(_freer(module, owned, streaming, prefetch.recycled))
    model.register_forward_hook(lambda _model, _args, _output: prefetch.recycled.clear())   # the pass is over
    return prefetch.recycled


class Prefetch:
    """Reads the next group of modules' weights (a numbered block such as ``model.layers.3``, else one module) in
    a background thread while the current group computes. Every read runs on that one thread; memory holds at
    most the running group's weights and the next group's, in float32 (a decoder layer is far smaller than the
    merge's bound, (inputs + 2) x the largest tensor).

    Only when the reads have a core of their own (``reads_ahead``): on the CPU the matrix products use torch's
    threads, and on 2 busy cores a reader beside them made the 1B pass slower (6.5 s against 5.4 s), not faster;
    otherwise each module's weights are read when it runs, on the calling thread, and the kernel is asked to read
    the next group's bytes into the page cache meanwhile (``Checkpoint.will_read``: no thread, no CPU of ours),
    which matters for a freshly merged output: it was written past the page cache, so it comes from the disk.
    ``tally`` (finite.FiniteTally) counts NaN and Inf in each tensor read, so the finite check need not read it
    again."""

    def __init__(self, owners: list, names: dict[int, str], checkpoint, device: torch.device, tally,
                 recycled: "Recycled", dtype: torch.dtype) -> None:
        keys = [_group(path) for path, _, _ in owners]
        order = list(dict.fromkeys(keys))
        self._groups = [[(module, owned) for (_, module, owned), key in zip(owners, keys) if key == group]
                        for group in order]
        self._group_of = {id(module): order.index(key) for (_, module, _), key in zip(owners, keys)}
        self._names, self._checkpoint, self._device, self._tally = names, checkpoint, device, tally
        self._dtype = dtype
        self._hinted = -1
        self.recycled = recycled
        self._pool = ThreadPoolExecutor(1, "mergekit-lite-prefetch") if reads_ahead(device) else None
        self._pending: dict[int, Future] = {}   # group index -> {id(module): {key: weight}}

    def weights(self, module: torch.nn.Module, owned: dict) -> dict[str, torch.Tensor]:
        group = self._group_of[id(module)]
        if self._pool is None:
            self._hint(group + 1)
            return self._read(owned)
        for stale in [g for g in self._pending if g < group or g > group + 1]:
            del self._pending[stale]              # a group that did not run (a VLM's vision tower on text)
        if group not in self._pending:
            self._pending[group] = self._pool.submit(self._read_group, group)
        if group + 1 < len(self._groups) and group + 1 not in self._pending:
            self._pending[group + 1] = self._pool.submit(self._read_group, group + 1)
        ready = self._pending[group].result()
        weights = ready.pop(id(module), None)
        if not ready:
            del self._pending[group]
        if weights is None:                       # a module that runs twice: read again
            weights = self._pool.submit(self._read, owned).result()
        return weights

    def _hint(self, group: int) -> None:
        """Ask the kernel for a group's bytes once, ahead of its reads."""
        will_read = getattr(self._checkpoint, "will_read", None)   # absent on a swapped view (moe_forward.py)
        if will_read is not None and group < len(self._groups) and group != self._hinted:
            self._hinted = group
            for _, owned in self._groups[group]:
                for empty in owned.values():
                    for name in _stored_names(self._names[id(empty)]):
                        will_read(name)

    def _read_group(self, group: int) -> dict[int, dict[str, torch.Tensor]]:
        return {id(module): self._read(owned) for module, owned in self._groups[group]}

    def _read(self, owned: dict) -> dict[str, torch.Tensor]:
        weights = {}
        for key, empty in owned.items():
            source = self._names[id(empty)]
            if isinstance(source, Fused):   # stacked experts: each stored tensor read into its place
                info = self._checkpoint.tensors[source.names[0]]
                weight = self._buffer(source.names[0], tuple(empty.shape), info.dtype)
                for name, view in source.places(weight):
                    self._fill(name, self._checkpoint.tensors[name], view)
            else:
                info = self._checkpoint.tensors[source]
                weight = self._buffer(source, tuple(info.shape), info.dtype)
                self._fill(source, info, weight)
            weights[key] = weight
        return weights

    def _buffer(self, name: str, shape: tuple, stored: torch.dtype) -> torch.Tensor:
        """An empty weight for ``name`` in the running dtype on the device: a freed layer's when it repeats."""
        dtype = self._dtype if stored.is_floating_point else stored
        if _numbered(name):
            return self.recycled.take(shape, dtype, self._device)
        self.recycled.clear()   # read once a pass (embedding, lm_head, final norm): nothing to reuse, and after
        return torch.empty(shape, dtype=dtype, device=self._device)   # the last layer its buffers are not needed

    def _fill(self, name: str, info, weight: torch.Tensor) -> None:
        fill_weight(self._checkpoint, name, weight, self.recycled.staging, self._count)

    def _count(self, name: str, stored: torch.Tensor, offset: int) -> None:
        if self._tally is not None:
            self._tally.add(name, stored, offset)

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class Recycled:
    """The weights a decoder layer's modules freed, handed to the next layer's modules of the same shapes, and one
    staging buffer for the stored bytes before they are upcast. A fresh tensor per weight cost a page fault per 4
    KiB, as large blocks are mapped from the kernel and unmapped when freed: at 1B, 1.7 million faults and 2.5 s
    of system time per pass. Only weights of numbered blocks (``model.layers.3``), which repeat, are kept: the
    embedding and ``lm_head`` are read once a pass and freed as before. Emptied at the end of each pass, so
    nothing is held between passes or while another model runs (``clear``), and neither is other memory the layers
    keep (``also``: the map of experts read one at a time, experts.py)."""

    def __init__(self, streaming: Streaming) -> None:
        self._streaming = streaming
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._ours: set[int] = set()    # data pointers of the buffers made here: only those come back
        self.staging = Staging()        # only the reader thread uses it
        self.also: list[Callable[[], None]] = []
        self._lock = threading.Lock()   # takes run on the reader thread, gives on the computing one

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with self._lock:
            free = self._free.get((shape, dtype, device))
            if free:
                return free.pop()
            self._streaming.allocated += 1
        weight = torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            self._ours.add(weight.data_ptr())
        return weight

    def give(self, weight: torch.Tensor) -> None:
        with self._lock:
            if weight.numel() and weight.data_ptr() in self._ours:
                self._free.setdefault((tuple(weight.shape), weight.dtype, weight.device), []).append(weight)

    def clear(self) -> None:
        with self._lock:
            for free in self._free.values():
                self._ours.difference_update(weight.data_ptr() for weight in free)
            self._free.clear()
            self.staging.clear()
        for clear in self.also:
            clear()


def _numbered(name: str) -> bool:
    """Whether a tensor belongs to a numbered block (``model.layers.3.mlp.up_proj.weight``), whose shapes repeat."""
    return any(part.isdigit() for part in name.split("."))


def reads_ahead(device: torch.device) -> bool:
    """Whether a reader thread has a core of its own: off the CPU (the device computes), or more cores than
    torch's intra-op threads use."""
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


def _group(path: str) -> str:
    """The prefetch group of a module: its path up to the first numbered part (``model.layers.3``), else itself."""
    parts = path.split(".")
    numbered = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[:numbered + 1]) if numbered is not None else path


def _loader(module: torch.nn.Module, owned: dict, prefetch: Prefetch, streaming: Streaming):
    def load(_runs: torch.nn.Module, _args) -> None:
        for key, weight in prefetch.weights(module, owned).items():
            module._parameters[key] = torch.nn.Parameter(weight, requires_grad=False)
            streaming.add(weight.numel() * weight.element_size())
    return load


def _freer(module: torch.nn.Module, owned: dict, streaming: Streaming, recycled: "Recycled"):
    def free(_runs: torch.nn.Module, _args, _output) -> None:
        for key, empty in owned.items():
            weight = module._parameters[key]
            if weight is not None and weight.device.type != "meta":
                streaming.live -= weight.numel() * weight.element_size()
                recycled.give(weight.detach())
            module._parameters[key] = empty
    return free


def _move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)
