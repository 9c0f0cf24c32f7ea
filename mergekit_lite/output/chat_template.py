"""The spec's ``chat_template``: a named format, ``auto`` (the inputs' most common template), or Jinja text.

The named templates are the texts of mergekit's five template files, so the output's tokenizer renders
exactly the prompts mergekit's would (docs/agreement.md). ``auto`` reads every merged model's template
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

# mergekit 0.1.5's template files (mergekit/_data/chat_templates/*.jinja), character for character: the output's
# tokenizer then carries the text mergekit writes, stray whitespace included (llama3 renders a newline after each
# <|eot_id|>, which Meta's own template does not; exaone's indentation is rendered), so a model merged here and
# one merged by mergekit prompt alike. tests/test_chat_templates.py compares them with mergekit's files.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"),
    "llama3": (
        "{% set loop_messages = messages %}\n"
        "{% for message in loop_messages %}\n"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
        "message['content'] | trim + '<|eot_id|>' %}\n"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n"
        "{{ content }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n"),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content'] %}\n"
        "    {%- set loop_messages = messages[1:] %}\n"
        "{%- else %}\n"
        "    {%- set loop_messages = messages %}\n"
        "{%- endif %}\n"
        "\n"
        "{{- bos_token }}\n"
        "{%- for message in loop_messages %}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}\n"
        "    {%- endif %}\n"
        "    {%- if message['role'] == 'user' %}\n"
        "        {%- if loop.first and system_message is defined %}\n"
        "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
        "        {%- else %}\n"
        "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
        "        {%- endif %}\n"
        "    {%- elif message['role'] == 'assistant' %}\n"
        "        {{- ' ' + message['content'] + eos_token}}\n"
        "    {%- else %}\n"
        "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"),
    "alpaca": (
        "{{ (messages|selectattr('role', 'equalto', 'system')|list|last).content|trim if "
        "(messages|selectattr('role', 'equalto', 'system')|list) else '' }}\n"
        "\n"
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n"
        "### Instruction:\n"
        "{{ message['content']|trim -}}\n"
        "{% if not loop.last %}\n\n\n{% endif %}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "### Response:\n"
        "{{ message['content']|trim -}}\n"
        "{% if not loop.last %}\n\n\n{% endif %}\n"
        "{% elif message['role'] == 'user_context' %}\n"
        "### Input:\n"
        "{{ message['content']|trim -}}\n"
        "{% if not loop.last %}\n\n\n{% endif %}\n"
        "{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n"
        "### Response:\n"
        "{% endif %}\n"),
    "exaone": (
        "{% for message in messages %}\n"
        "    {% if loop.first and message['role'] != 'system' %}\n"
        "        {{ '[|system|][|endofturn|]\\n' }}\n"
        "    {% endif %}\n"
        "    {{ '[|' + message['role'] + '|]' + message['content'] }}\n"
        "    {% if message['role'] == 'user' %}\n"
        "        {{ '\\n' }}\n"
        "    {% else %}\n"
        "        {{ '[|endofturn|]\\n' }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "    {{ '[|assistant|]' }}\n"
        "{% endif %}\n"),
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
