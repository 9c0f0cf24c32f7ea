"""The spec's ``chat_template``: a named format, ``auto`` (the inputs' most common template), or Jinja text.

The named templates are our own Jinja texts of the five formats mergekit names: chatml and mistral render
what mergekit's render; llama3, alpaca and exaone render their formats without the stray whitespace of
mergekit's files (docs/agreement.md). ``auto`` reads every merged model's template
as transformers loads it (tokenizer_config.json, or chat_template.jinja) and takes the most common one,
the first in spec order on a tie; when no model has one, the output's tokenizer is left as it is.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

from ..plan.planner import MergePlan
from ..plan.vocabulary import load_tokenizer

log = logging.getLogger("mergekit_lite")

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": (
        "{{ bos_token }}{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
        "{% for message in (messages[1:] if system is not none else messages) %}"
        "{% if message['role'] == 'user' %}{{ ' [INST] ' + ((system + '\\n\\n') if loop.first and system is not none "
        "else '') + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + eos_token }}{% else %}{{ raise_exception('mistral takes user and assistant "
        "messages after an optional system message') }}{% endif %}{% endfor %}"),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] | trim + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}"
        "{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | trim + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{ '### Response:\\n' }}{% endif %}"),
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"),
}


def chat_template_text(plan: MergePlan) -> Optional[str]:
    """The template the output's tokenizer gets, or None to leave it as it is."""
    wanted = plan.spec.chat_template
    if wanted is None:
        return None
    if wanted in TEMPLATES:
        return TEMPLATES[wanted]
    if wanted != "auto":
        return wanted
    found = []
    for ref, where in plan.spec.references():
        if where.startswith("tokenizer") or ref not in plan.checkpoints:
            continue
        checkpoint = plan.checkpoints[ref]   # as mergekit: a model without a loadable tokenizer has no vote
        tokenizer = load_tokenizer(checkpoint.folder, checkpoint.label, required=False)
        template = tokenizer.chat_template if tokenizer is not None else None
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    if not found:
        log.warning("chat_template: auto: no merged model has a chat template; the tokenizer's is kept")
        return None
    return Counter(found).most_common(1)[0][0]
