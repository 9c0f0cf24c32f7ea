"""The forward check after a tokenizer merge that grew or reordered the vocabulary: the merged model and its inputs
compared on the tokens they share.

The batch is made with the output's tokenizer (its ids). Every output id whose token text every input has too
is shared; an id of the batch that is not is replaced by a shared one (``shared[id % count]``: fixed, so every
run sees the same batch), so that each input can run the very same text. Each input runs the batch with each
output id mapped to its own id of the same token (the plan's map, built from the tokenizers in the folders:
plan/vocabulary.py), and its logits are read at its own ids of the shared tokens, in output order. The merged
model's logits are read at the shared output ids. So both sides are (batch, seq, shared) on the same text, and
forward.py compares them as it compares any merge with the input it must equal; where the merge need not equal
an input, the inputs' losses (on their own full vocabularies) are context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SharedTokens:
    output_ids: torch.Tensor                 # (shared,) the shared tokens' output ids, ascending
    input_ids: dict[str, torch.Tensor]       # input label -> (size,) its id per output id, -1: none
    size: int                                # the output's rows (its vocabulary, padded)

    @property
    def count(self) -> int:
        return int(self.output_ids.numel())

    def batch(self, batch):
        """The batch with every id outside the shared tokens replaced by a shared one (fixed: id % count)."""
        from .inference import Batch

        ids = batch.input_ids
        known = torch.zeros(self.size, dtype=torch.bool)
        known[self.output_ids] = True
        ok = (ids >= 0) & (ids < self.size) & known[ids.clamp(0, self.size - 1)]
        return Batch(torch.where(ok, ids, self.output_ids[ids % self.count]), batch.attention_mask, batch.source)

    def restrict(self, merged: torch.Tensor) -> torch.Tensor:
        """The merged model's logits at the shared output ids."""
        return merged[..., self.output_ids]

    UNMATCHED = "its tokenizer could not be matched with the output's"

    @property
    def note(self) -> str:
        return f"ran the batch on its own ids; compared on the {self.count} tokens the output shares with every input"

    def batch_for(self, label: str, batch):
        """The batch on the input's own ids of the same tokens; None when its tokenizer was not matched."""
        from .inference import Batch

        own = self.input_ids.get(label)
        return None if own is None else Batch(own[batch.input_ids], batch.attention_mask, batch.source)

    def at_shared(self, label: str, logits: torch.Tensor) -> torch.Tensor:
        """An input's logits at its ids of the shared tokens, in the output's order."""
        return logits[..., self.input_ids[label][self.output_ids]]


def shared_tokens(plan, models: list) -> Optional[SharedTokens]:
    """The tokens the output shares with every input, when a tokenizer merge gave the output other ids than an
    input's (grown, reordered, stripped) or another number of logits; None otherwise (no tokenizer merge, or every
    input has the output's ids and rows: the plain comparison applies). ``models``: forward.py's InputModels (label, folder)."""
    vocabulary = getattr(plan, "vocabulary", None) if plan is not None else None
    if vocabulary is None or not models:
        return None
    from ..plan.vocabulary import vocab_size

    size = vocabulary.size
    refs = {str(ref): ref for ref in vocabulary.maps}
    own = {model.label: _padded(vocabulary.maps[refs[model.label]], size) for model in models if model.label in refs}
    if not own:
        return None
    rows = torch.arange(size)
    if len(own) == len(models) and all(torch.equal(ids, rows) and vocab_size(plan.checkpoints[refs[label]]) == size
                                       for label, ids in own.items()):
        return None   # the same ids and as many logits as the output: the plain comparison
    shared = torch.ones(size, dtype=torch.bool)
    for ids in own.values():
        shared &= ids >= 0
    output_ids = torch.nonzero(shared).flatten()
    if output_ids.numel() == 0:
        return None
    return SharedTokens(output_ids, own, size)


def _padded(ids: torch.Tensor, size: int) -> torch.Tensor:
    """A map over the output's rows (padding rows beyond the vocabulary: no token, -1)."""
    out = torch.full((size,), -1, dtype=torch.long)
    out[:ids.numel()] = ids[:size]
    return out
