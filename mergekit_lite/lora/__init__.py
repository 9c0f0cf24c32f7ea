"""Folding PEFT LoRA adapters into base weights as they are read, bit for bit as peft's merge_and_unload().

``config.py`` reads adapter_config.json (scaling, patterns, refusals), ``adapter.py`` the adapter's tensor
table and key grammar, ``fold.py`` is the arithmetic, ``identity.py`` checks the adapter was made for the
base, ``source.py`` makes ``base+adapter`` a checkpoint any merge can read, ``fold_lora`` and
the fold spec are in ``api/fold.py``, and ``testing/adapters.py`` writes small adapters without peft.
"""
