"""The Hugging Face Hub: the lazily imported client and token handling (client), resolving and downloading
inputs (pull), and publishing an output (push_plan decides what, push sends it).
"""
