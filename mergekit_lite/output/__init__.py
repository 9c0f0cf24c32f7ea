"""The output folder: the shard writer (direct I/O), the folder's life (partial, lock, commit), companions
(config, tokenizer, card, recipe), run settings, and the resume journal.
"""
