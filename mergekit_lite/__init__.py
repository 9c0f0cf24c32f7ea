"""mergekit_lite: merge language models and fold LoRA adapters, streamed tensor by tensor.

``from mergekit_lite import load_spec, run_merge, validate, push_to_hub``. Heavy modules (torch, the Hub
client) load on first use, so importing the package is instant.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_spec": "mergekit_lite.spec.schema",
    "Spec": "mergekit_lite.spec.schema",
    "run_merge": "mergekit_lite.api.merge",
    "make_plan": "mergekit_lite.plan.planner",
    "MergeResult": "mergekit_lite.api.merge",
    "MergeSettings": "mergekit_lite.api.merge",
    "ValidationFailed": "mergekit_lite.api.merge",
    "load_tensor": "mergekit_lite.api.tensors",
    "validate": "mergekit_lite.validation",
    "ValidationReport": "mergekit_lite.validation",
    "fold_lora": "mergekit_lite.api.fold",
    "merge_adapters": "mergekit_lite.api.adapters",
    "extract_lora": "mergekit_lite.api.extract",
    "run_moe": "mergekit_lite.api.moe",
    "Strategy": "mergekit_lite.strategy",
    "Param": "mergekit_lite.strategy",
    "TensorContext": "mergekit_lite.strategy",
    "MergeError": "mergekit_lite.errors",
    "SpecError": "mergekit_lite.errors",
    "HubError": "mergekit_lite.errors",
    "push_to_hub": "mergekit_lite.hub.push",
    "PushResult": "mergekit_lite.hub.push",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mergekit_lite' has no attribute '{name}'")


def __dir__() -> list[str]:
    """The lazy exports too, so ``dir(mergekit_lite)`` and tab completion show them."""
    return sorted(set(globals()) | set(__all__))
