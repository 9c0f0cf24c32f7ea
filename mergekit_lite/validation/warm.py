"""Warming: the forward check's imports done while the merge writes, so the validation does not wait for them.

Importing transformers and the model's modelling module costs 3-5 s of one core before the forward check can
build anything: at 1B, half of that check's time. A merge spends its time reading and writing files, with a
core to spare, so a background thread imports them from the start of the merge, and the validation waits for
that thread before it imports anything itself. Only modules are imported: nothing is built, read or
allocated, so the warming changes what the checks do in no way. A failed import in the thread is dropped:
the forward check imports again (a no-op once warm) and reports the failure itself.
"""

from __future__ import annotations

import threading
from typing import Optional


class Warming:
    """The imports running in a daemon thread; ``wait()`` before the validation starts."""

    def __init__(self, model_type: Optional[str], adapters: bool = False):
        self._thread = threading.Thread(target=_import, args=(model_type, adapters), name="validation-warming",
                                        daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()


def start(config: dict, adapters: bool = False) -> Warming:
    """Begin importing what the forward check of a model with this config.json will need; ``adapters``: an
    input applies LoRA adapters, which the forward check runs with peft."""
    model_type = config.get("model_type")
    return Warming(model_type if isinstance(model_type, str) else None, adapters)


def _import(model_type: Optional[str], adapters: bool) -> None:
    try:
        from .inference import _auto_class_name, _quiet

        with _quiet():
            import transformers

            name = _auto_class_name(model_type) if model_type else None
            if name:   # the auto class resolves (and imports) the modelling module for this model type
                mapping = getattr(transformers, name)._model_mapping
                mapping[transformers.AutoConfig.for_model(model_type).__class__]
            if adapters:
                import peft  # noqa: F401
    except Exception:   # noqa: BLE001 - the forward check repeats the import and reports what fails
        pass
