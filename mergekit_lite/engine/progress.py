"""A byte-counting progress bar with an ETA (tqdm; the notebook widget when running in Jupyter)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def byte_progress(total: int, enabled: bool = True, desc: str = "merging") -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, dynamic_ncols=True) as bar:
        yield bar.update
