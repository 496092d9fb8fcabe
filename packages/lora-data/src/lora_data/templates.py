"""The documented default chat template, used when a tokenizer has none (dependency-free: fingerprint needs it too).

ChatML-like: each message is `<|im_start|>{role}\\n{content}{eos_token}\\n`, so the end-of-turn marker is the
tokenizer's own EOS token and a model trained on it learns to stop. For example, with eos `</s>`::

    <|im_start|>user\\nHi</s>\\n<|im_start|>assistant\\nHello!</s>\\n

`<|im_start|>` is plain text to a tokenizer that lacks it as a special token; that is fine, it is only scaffolding
(masked out of the loss).
"""

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
