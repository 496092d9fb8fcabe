"""Render + mask: loss exactly on each assistant content and its end-of-turn token, for every template."""

from __future__ import annotations

import json
import random

import _tiny
import numpy as np
import pytest
from lora_data.render import Renderer, RenderError
from lora_data.tokenize import Encoder, render

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Sum?"},
    {"role": "assistant", "content": "2 + 2 = 4"},
]
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "plain": "<|endoftext|>"}


def _masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize("kind", ["chatml", "llama3", "plain"])
def test_mask_literal(tokenizers, kind):
    tok = tokenizers[kind]
    ids, mask = render(CONV, tok)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert _masked_text(tok, ids, mask) == f"Hello!{EOT[kind]}2 + 2 = 4{EOT[kind]}"
    # the ids are what the model sees at inference: apply_chat_template(tokenize=True) gives the same
    if kind != "plain":
        assert ids == tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]


def test_chatml_mask_by_hand(tokenizers):
    tok = tokenizers["chatml"]
    ids, mask = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tok)
    pieces = [tok.decode([i]) for i in ids]
    masked = [p for p, m in zip(pieces, mask, strict=True) if m]
    assert "".join(masked) == "Yo<|im_end|>"
    assert masked[-1] == "<|im_end|>" and pieces[-1] == "\n" and mask[-1] == 0  # the newline after it is scaffolding
    assert "".join(pieces) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"


def test_llama3_bos_not_doubled_and_content_trimmed(tokenizers):
    tok = tokenizers["llama3"]
    ids, mask = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Yo \n"}], tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert _masked_text(tok, ids, mask) == "Yo<|eot_id|>"  # the Llama-3 template trims content


LLAMA2_TEMPLATE = (  # Llama-2-chat / CodeLlama-Instruct: a space between the answer and EOS
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_eos_after_a_space_is_trained(tokenizers):
    tok = tokenizers["plain"]
    r = Renderer(tok)
    r._template = r._template.environment.from_string(LLAMA2_TEMPLATE)
    conv = [{"role": "user", "content": "France?"}, {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Germany?"}, {"role": "assistant", "content": " Berlin. "}]
    out = r.render(conv)
    assert out.text == "[INST] France? [/INST] Paris. <|endoftext|>[INST] Germany? [/INST] Berlin. <|endoftext|>"
    assert [out.text[a:b] for a, b in out.spans] == ["Paris. <|endoftext|>", "Berlin. <|endoftext|>"]


def test_a_date_stamping_template_renders_one_date_for_the_whole_run(tokenizers, monkeypatch):
    """Llama-3.1 writes `strftime_now(...)` into every system prompt: a prepare that runs past midnight keeps the date
    it started with, so the scaffold cached for a sequence of roles still matches and no record is rejected."""
    import datetime as dt

    from lora_data import render as render_module
    from lora_data import sandbox

    days = iter(dt.datetime(2026, 1, d, 23, 59) for d in range(1, 30))

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return next(days)

    for module in (render_module, sandbox):
        monkeypatch.setattr(module, "datetime", Clock, raising=False)
    r = Renderer(tokenizers["chatml"])
    r._template = r._template.environment.from_string(
        "Today: {{ strftime_now('%d %b %Y') }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    texts = [r.render(conv).text for _ in range(3)]
    assert texts == ["Today: 01 Jan 2026\nuser: Hi\nassistant: Yo\n"] * 3


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_a_record_the_template_renders_as_nothing_is_rejected(tokenizers, train_on_inputs):
    r = Renderer(tokenizers["chatml"], train_on_inputs=train_on_inputs)
    r._template = r._template.environment.from_string(  # renders only conversations that open with a user turn
        "{% if messages[0]['role'] == 'user' %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% endif %}")
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (got,) = r.render_batch([conv])
    assert isinstance(got, RenderError) and "renders this record as no text" in str(got)


def test_plain_tokenizer_gets_documented_default(tokenizers):
    from lora_data.templates import DEFAULT_CHAT_TEMPLATE

    tok = tokenizers["plain"]
    r = Renderer(tok)
    assert r.template_source == "default" and tok.chat_template is None and "eos_token" in DEFAULT_CHAT_TEMPLATE
    text = r.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]).text
    assert text == "<|im_start|>user\nHi<|endoftext|>\n<|im_start|>assistant\nYo<|endoftext|>\n"


def test_train_on_inputs_masks_everything(tokenizers):
    ids, mask = render(CONV, tokenizers["chatml"], train_on_inputs=True)
    assert mask == [1] * len(ids)


def test_tool_turns_are_masked_out(tokenizers):
    tok = tokenizers["chatml"]
    conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "call"},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]
    ids, mask = render(conv, tok)
    assert _masked_text(tok, ids, mask) == "call<|im_end|>It is sunny.<|im_end|>"


def test_template_that_rewrites_content_is_reported(tokenizers):
    tok = tokenizers["chatml"]
    r = Renderer(tok)
    r._template = r._template.environment.from_string(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}")
    with pytest.raises(RenderError, match=r"messages\[0\]\.content: the chat template changes this content"):
        r.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_a_template_that_rewrites_a_later_message_names_that_message(tokenizers):
    """Reasoning the template takes out of an answer and writes before it (as Qwen3 does with an inline <think>)
    breaks the scaffold after the message before: the reject names the answer, not the user turn."""
    r = Renderer(tokenizers["chatml"])
    r._template = r._template.environment.from_string(
        "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}<t>{% if '</think>' in m['content'] %}"
        "{{ m['content'].split('</think>')[0][7:] }}{% endif %}</t>{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    with pytest.raises(RenderError, match=r"messages\[1\]\.content: the chat template writes text between "
                                          r"messages\[0\] and this content"):
        r.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>yo"}])


TOOLS_TEMPLATE = (  # ChatML as Qwen3 writes tools, tool calls and reasoning (its structure, in few lines)
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if m.get('reasoning_content') %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}"
    "{{ m['content'] or '' }}{% for call in m.get('tool_calls') or [] %}{% if m['content'] or not loop.first %}"
    "{{ '\\n' }}{% endif %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}


@pytest.mark.parametrize("content", ["Let me check.", "", None])
def test_tool_calls_and_reasoning_are_trained_as_the_assistant_writes_them(tokenizers, content):
    """What the template writes for an assistant turn's other keys is the turn's output: its tool calls (after some
    content, an empty one or none, which the template renders differently) and its reasoning up to the answer. The
    record's tools are passed to the template, as apply_chat_template passes them, and are not trained."""
    r = Renderer(tokenizers["chatml"])
    r._template = r._template.environment.from_string(TOOLS_TEMPLATE)
    conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": content, "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny.", "reasoning_content": "The tool said so."}]
    out = r.render(conv, context={"tools": [{"name": "weather"}]})
    call = '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
    first = f"{content}\n{call}" if content else call
    assert out.text.startswith('<|im_start|>system\nTools: [{"name": "weather"}]<|im_end|>\n<|im_start|>user\n')
    assert [out.text[a:b] for a, b in out.spans] == [
        f"{first}<|im_end|>", "<think>\nThe tool said so.\n</think>\n\nSunny.<|im_end|>"]


QWEN3_LAST_TURN = TOOLS_TEMPLATE.replace(  # Qwen3 also opens an empty <think> block on the last turn only
    "{% if m.get('reasoning_content') %}", "{% if loop.last and not m.get('reasoning_content') %}<think>\n\n</think>\n\n"
    "{% endif %}{% if m.get('reasoning_content') %}") + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def test_an_empty_tool_result_is_never_trained_with_the_turns_around_it(tokenizers):
    """A command with no output: the empty result is located like any content (only the answers' empty contents are
    left in place first), so each call is trained alone. Where the template writes an empty result otherwise, which
    of the text between the contents around it is the call's cannot be told: the record is refused."""
    r = Renderer(tokenizers["chatml"])
    r._template = r._template.environment.from_string(QWEN3_LAST_TURN)
    ask, done = {"role": "user", "content": "Make dirs."}, {"role": "assistant", "content": "Done."}
    calls = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "bash", "arguments": {"cmd": f"mkdir {d}"}}}]} for d in "ab"]
    empty = {"role": "tool", "content": ""}
    written = [f'<tool_call>{{"name": "bash", "arguments": {{"cmd": "mkdir {d}"}}}}</tool_call><|im_end|>' for d in "ab"]
    out = r.render([ask, calls[0], empty, done])
    assert [out.text[a:b] for a, b in out.spans] == [written[0], "Done.<|im_end|>"]
    out = r.render([ask, calls[0], empty, calls[1], empty, done])
    assert [out.text[a:b] for a, b in out.spans] == [*written, "Done.<|im_end|>"]
    r._template = r._template.environment.from_string(QWEN3_LAST_TURN.replace(
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}",
        "{{ m['content'] or '(no output)' }}<|im_end|>\n{% endif %}{% endfor %}"))
    with pytest.raises(RenderError, match=r"messages\[2\]\.content: cannot tell what the chat template writes for "
                                          r"each of the turns"):
        r.render([ask, calls[0], empty, done])


MISTRAL_TOOLS_TEMPLATE = (  # Mistral v3's shape: roles must alternate, turns with tool calls and tool results apart,
    # the tool list before the last user turn
    "{% set last = namespace(i=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}{% set last.i = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'user' or (m['role'] == 'assistant' "
    "and not m.get('tool_calls')) %}{% if (m['role'] == 'user') != (ns.n % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{% set ns.n = ns.n + 1 %}{% endif %}"
    "{% if m['role'] == 'user' %}{% if tools and loop.index0 == last.i %}[AVAILABLE_TOOLS] {{ tools | tojson }}"
    "[/AVAILABLE_TOOLS]{% endif %}[INST] {{ m['content'] }}[/INST]{% elif m['role'] == 'tool' %}"
    "[TOOL_RESULTS] {{ m['content'] }}[/TOOL_RESULTS]{% elif m.get('tool_calls') %}[TOOL_CALLS] "
    "{{ m['tool_calls'] | map(attribute='function') | list | tojson }}{{ eos_token }}{% else %}"
    "{{ ' ' + m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
QWEN25_TEMPLATE = (  # Qwen2.5's assistant branch: content concatenated (null only where tool calls follow)
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant{% if m['content'] %}\n"
    "{{ m['content'] }}{% endif %}{% for c in m.get('tool_calls') or [] %}\n<tool_call>"
    "{{ c['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize(("template", "content", "want"), [
    (MISTRAL_TOOLS_TEMPLATE, None, '[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Paris"}}]<|endoftext|>'),
    (MISTRAL_TOOLS_TEMPLATE, "", '[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Paris"}}]<|endoftext|>'),
    (QWEN25_TEMPLATE, None, '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'),
])
def test_a_tool_call_turn_is_found_where_the_template_writes_it(tokenizers, template, content, want):
    """The turn is what the template adds after the conversation before it with the generation prompt: no
    conversation the user did not write is rendered (Mistral refuses one whose roles no longer alternate)."""
    r = Renderer(tokenizers["plain"])
    r._template = r._template.environment.from_string(template)
    conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": content, "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    out = r.render(conv)
    trained = [out.text[a:b] for a, b in out.spans]
    assert trained[0] == want and len(trained) == 2


def test_a_tool_turn_is_found_where_the_tool_list_moved_past_it(tokenizers):
    """Mistral writes the tool list before the last user turn: the text before an earlier turn is not the prompt it
    was rendered after, and the turn is found between the messages around it."""
    r = Renderer(tokenizers["plain"])
    r._template = r._template.environment.from_string(MISTRAL_TOOLS_TEMPLATE)
    rome = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}
    conv = [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "Rome?"}, {"role": "assistant", "content": None, "tool_calls": [rome]},
            {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rainy."}]
    out = r.render(conv, context={"tools": [{"name": "weather"}]})
    calls = [f'[TOOL_CALLS] [{json.dumps(c["function"])}]<|endoftext|>' for c in (CALL, rome)]
    assert [out.text[a:b] for a, b in out.spans] == [calls[0], "Sunny.<|endoftext|>", calls[1], "Rainy.<|endoftext|>"]


def test_identical_tool_turns_sharing_a_window_are_found_in_order(tokenizers):
    """Two identical calls with empty results between them (no content located between): where the window holds the
    call as many times as the turns there write it, they are found in message order; a result that repeats the call
    is content, located, and never taken for a turn."""
    r = Renderer(tokenizers["plain"])
    r._template = r._template.environment.from_string(MISTRAL_TOOLS_TEMPLATE)
    call = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    conv = [{"role": "user", "content": "Paris?"}, call, {"role": "tool", "content": ""}, call,
            {"role": "tool", "content": ""}, {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "Rome?"}, {"role": "assistant", "content": "Rainy."}]
    out = r.render(conv, context={"tools": [{"name": "weather"}]})
    written = f'[TOOL_CALLS] [{json.dumps(CALL["function"])}]<|endoftext|>'
    assert [out.text[a:b] for a, b in out.spans] == [written, written, "Sunny.<|endoftext|>", "Rainy.<|endoftext|>"]
    assert out.spans[0][1] < out.spans[1][0]
    conv[4] = {"role": "tool", "content": written}
    out = r.render(conv, context={"tools": [{"name": "weather"}]})
    assert [out.text[a:b] for a, b in out.spans] == [written, written, "Sunny.<|endoftext|>", "Rainy.<|endoftext|>"]
    assert out.text.count(written) == 3


@pytest.mark.parametrize(("when", "trained"), [
    ("not loop.last", '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'),
    ("loop.last", None)])
def test_whether_a_template_writes_a_turns_tool_calls_is_read_from_the_whole_record(tokenizers, when, trained):
    """A template may write tool calls only in some positions: the record's own text decides, not the turn rendered
    as the last message (calls written only before a tool result were rejected, only on the last turn lost)."""
    r = Renderer(tokenizers["chatml"])
    r._template = r._template.environment.from_string(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}{% if m.get('tool_calls') and "
        + when + " %}<tool_call>{{ m['tool_calls'][0]['function'] | tojson }}</tool_call>{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    (got,) = r.render_batch([conv])
    if trained is None:
        assert isinstance(got, RenderError) and got.field == "messages[1].tool_calls"
    else:
        assert [got.text[a:b] for a, b in got.spans] == [trained, "Sunny.<|im_end|>"]


def test_a_template_that_writes_the_calls_alone_rejects_a_turn_with_content_too(tokenizers):
    r = Renderer(tokenizers["chatml"])  # Llama-3.1 writes a tool-call turn as the call alone
    r._template = r._template.environment.from_string(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.get('tool_calls') %}"
        "{{ m['tool_calls'][0]['function'] | tojson }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}")
    for content in ("Let me check.", "<think>Let me check.</think>"):  # reasoning or not, it would be lost
        conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": content, "tool_calls": [CALL]}]
        with pytest.raises(RenderError, match=r"messages\[1\]\.content: the chat template leaves out the content "
                                              r"of this turn with tool_calls"):
            r.render(conv)
    conv[1]["content"] = ""
    assert [r.render(conv).text[a:b] for a, b in r.render(conv).spans] == [
        '{"name": "weather", "arguments": {"city": "Paris"}}<|im_end|>']


def test_a_template_that_does_not_write_tool_calls_rejects_the_turn(tokenizers):
    """ChatML as shipped writes content only: the tool call would vanish and the turn train an empty answer."""
    r = Renderer(tokenizers["chatml"])
    for content in ("", "I'll check the weather."):  # the function's name in the content changes nothing
        conv = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": content, "tool_calls": [CALL]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
        (got,) = r.render_batch([conv])
        assert isinstance(got, RenderError) and got.field == "messages[1].tool_calls"
    assert "does not write this turn's tool_calls, so they would not be trained" in str(got)


def test_the_header_of_a_template_without_a_generation_prompt_is_not_trained(tokenizers):
    """TOOLS_TEMPLATE ignores add_generation_prompt: the turn's own header stays prompt. An assistant turn's other
    keys that are not output (`name`) keep the turn plain."""
    r = Renderer(tokenizers["chatml"])
    r._template = r._template.environment.from_string(TOOLS_TEMPLATE.replace(
        "<|im_start|>assistant\n", "<|im_start|>assistant{{ ' (' + m['name'] + ')' if m.get('name') }}\n"))
    conv = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "On it.", "tool_calls": [CALL], "name": "bot"},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny.", "name": "bot"}]
    out = r.render(conv)
    assert "<|im_start|>assistant (bot)\nOn it." in out.text
    assert [out.text[a:b] for a, b in out.spans] == [
        'On it.\n<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>',
        "Sunny.<|im_end|>"]


HARMONY_TEMPLATE = (  # GPT-OSS's shape: a tool call's thinking is written only until a final answer follows, a final
    # answer's thinking only on the last turn
    "<|start|>system<|message|>Reasoning: medium<|end|>{% set last = namespace(name=none) %}"
    "{% for m in messages %}{% if m.role == 'assistant' and 'tool_calls' in m %}"
    "{% set final = namespace(found=false) %}{% for later in messages[loop.index:] %}"
    "{% if later.role == 'assistant' and 'tool_calls' not in later %}{% set final.found = true %}{% endif %}"
    "{% endfor %}{% if m.thinking and not final.found %}"
    "<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "<|start|>assistant to=functions.{{ m.tool_calls[0].function.name }}<|channel|>commentary json<|message|>"
    "{{ m.tool_calls[0].function.arguments | tojson }}<|call|>{% set last.name = m.tool_calls[0].function.name %}"
    "{% elif m.role == 'assistant' and loop.last and not add_generation_prompt %}"
    "{% if 'thinking' in m %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|return|>"
    "{% elif m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{% elif m.role == 'tool' %}{% if last.name is none %}{{ raise_exception('no tool call before') }}{% endif %}"
    "<|start|>functions.{{ last.name }} to=assistant<|channel|>commentary<|message|>{{ m.content | tojson }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}")


def test_reasoning_the_template_leaves_out_is_not_trained_and_the_turns_around_it_are(plain_tokenizer_dir):
    """GPT-OSS drops a tool call's thinking once a final answer follows (and a final answer's before the last turn):
    the call and the last answer with its thinking are trained as the text holds them; the rest of the thinking is
    not in the text. A call that is the last turn keeps its thinking, trained. A tool result is written JSON-escaped
    (`| tojson`), and located so."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|return|>"]})
    tok.eos_token, tok.chat_template = "<|return|>", HARMONY_TEMPLATE
    r = Renderer(tok)
    call = ' to=functions.weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
    ask, result = {"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"}
    thinking_call = {"role": "assistant", "content": "", "thinking": "Need the tool.", "tool_calls": [CALL]}
    answer = {"role": "assistant", "content": "Sunny.", "thinking": "It said sunny."}
    last = "<|channel|>analysis<|message|>It said sunny.<|end|><|start|>assistant<|channel|>final<|message|>Sunny.<|return|>"
    cases = [
        ([ask, thinking_call, result, answer], [call, last]),
        ([ask, thinking_call, result, thinking_call, result, answer], [call, call, last]),
        ([ask, thinking_call, result, answer, {"role": "user", "content": "Thanks"},
          {"role": "assistant", "content": "Welcome.", "thinking": "polite"}],
         [call, "Sunny.<|end|>", last.replace("It said sunny.", "polite").replace("Sunny.", "Welcome.")]),
        ([ask, thinking_call], ["<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant" + call]),
        ([ask, thinking_call, {"role": "tool", "content": '{"sky": "clear"}\nC:\\temp'}, answer], [call, last]),
    ]
    for conv, trained in cases:
        (out,) = r.render_batch([conv])
        assert not isinstance(out, RenderError), out
        assert [out.text[a:b] for a, b in out.spans] == trained
        assert out.text == tok.apply_chat_template(conv, tokenize=False)
    both = {**thinking_call, "tool_calls": [CALL, {"type": "function", "function": {"name": "time", "arguments": {}}}]}
    (got,) = r.render_batch([[ask, both, result, result, answer]])  # the template writes the first call only
    assert isinstance(got, RenderError) and got.field == "messages[1].tool_calls[1]", got
    assert "writes only some of this turn's 2 tool calls" in str(got)


QWEN3_THINK_TEMPLATE = (  # Qwen3's reasoning: read from reasoning_content or split out of the content, written only
    # after the last user turn
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}{% if m.role == 'assistant' %}{% set content = m.content %}"
    "{% set reasoning = m.reasoning_content or '' %}{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last %}<think>\n{{ reasoning.strip('\\n') }}\n</think>\n\n{% endif %}{{ content }}"
    "<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("inline", [True, False])
def test_reasoning_written_into_the_content_trains_as_reasoning_content_does(tokenizers, inline):
    """R1-distilled data writes `<think>...</think>` into the answer: where the template splits it out (Qwen3), the
    last turn's is trained as the template writes it and an earlier turn's, left out of the text, is not."""
    r = Renderer(tokenizers["chatml"])
    r._template = r._template.environment.from_string(QWEN3_THINK_TEMPLATE)

    def answer(thought, text):
        if inline:
            return {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{text}"}
        return {"role": "assistant", "content": text, "reasoning_content": thought}

    one = [{"role": "user", "content": "2+2?"}, answer("add", "4")]
    two = [*one, {"role": "user", "content": "3+3?"}, answer("sum up", "6")]
    blank = [{"role": "user", "content": "Hm."}, answer("nothing to say", ""), *two[2:]]  # whitespace after </think>
    for conv, trained in ((one, ["<think>\nadd\n</think>\n\n4<|im_end|>"]),
                          (two, ["4<|im_end|>", "<think>\nsum up\n</think>\n\n6<|im_end|>"]),
                          (blank, ["<|im_end|>", "<think>\nsum up\n</think>\n\n6<|im_end|>"])):
        (out,) = r.render_batch([conv])
        assert not isinstance(out, RenderError), out
        assert [out.text[a:b] for a, b in out.spans] == trained


def test_a_records_tools_and_template_kwargs_reach_the_template(tmp_path, chatml_tokenizer_dir):
    """`tools`, `documents` and `chat_template_kwargs` of a chat record render as apply_chat_template renders them;
    null content is valid only on an assistant turn with tool_calls."""
    from lora_data.records import read_records

    tools = [{"type": "function", "function": {"name": "weather"}}]
    lines = [{"messages": [{"role": "user", "content": "Weather?"},
                           {"role": "assistant", "content": None, "tool_calls": [CALL]}], "tools": tools,
              "chat_template_kwargs": {"enable_thinking": False}, "id": 7},
             {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
              "tools": json.dumps(tools)},  # as HF datasets often store them
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "w"},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": ""},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "null"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    record, no_user, no_call, in_a_string, not_json, empty, null = read_records(tmp_path / "in.jsonl")
    assert record.context == {"tools": tools, "enable_thinking": False} and in_a_string.context == {"tools": tools}
    assert empty.context == null.context == {}  # an empty cell of a string column: no tools
    assert [(x.field, x.code) for x in (no_user, no_call, not_json)] == [
        ("messages[0].content", "null_content"), ("messages[1].content", "null_content"), ("tools", "bad_tools")]
    r = Renderer(tokenizers_of(chatml_tokenizer_dir))
    r._template = r._template.environment.from_string(
        "{{ tools | tojson }} {{ enable_thinking }}|" + TOOLS_TEMPLATE)
    (got,) = r.render_batch([record.messages], [record.context])
    assert got.text.startswith('[{"type": "function", "function": {"name": "weather"}}] False|<|im_start|>system\n')


def tokenizers_of(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _random_conversations(n, seed=0):
    rng = random.Random(seed)
    words = [*_tiny._WORDS.split(), "ünï", "日本", "—", "  ", "\n", "\t", "<|im_end|>x", "  trailing "]
    convs = []
    for rec in _tiny.chat_records(n, seed=seed):
        msgs = rec["messages"]
        for m in msgs:  # sprinkle whitespace edges, unicode and special-looking text into contents
            if rng.random() < 0.3:
                m["content"] = rng.choice(words) + m["content"] + rng.choice(words)
        convs.append(msgs)
    return convs


@pytest.mark.parametrize("kind", ["chatml", "llama3", "plain"])
def test_decoding_the_mask_gives_back_every_assistant_message(tokenizers, kind):
    """THE correctness test: for every record, masked-in tokens decode to each assistant message + end-of-turn."""
    tok = tokenizers[kind]
    renderer, encoder = Renderer(tok), Encoder(tok)
    convs = _random_conversations(300)
    rendered = renderer.render_batch(convs)
    ids, masks = encoder.encode(rendered)
    trim = kind == "llama3"
    for conv, i, m in zip(convs, ids, masks, strict=True):
        want = "".join((x["content"].strip() if trim else x["content"]) + EOT[kind]
                       for x in conv if x["role"] == "assistant")
        assert tok.decode(i[m == 1].tolist()) == want


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_byte_table_path_equals_offsets_path(tokenizers, kind):
    tok = tokenizers[kind]
    rendered = Renderer(tok).render_batch(_random_conversations(200, seed=1))
    fast = Encoder(tok)
    assert fast.byte_level
    slow = Encoder(tok)
    slow.byte_level = False
    for a, b in zip(fast.encode_flat(rendered), slow.encode_flat(rendered), strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_render_equals_one_by_one(tokenizers):
    r = Renderer(tokenizers["llama3"])
    convs = _random_conversations(50)
    assert r.texts(convs) == [r.text(c) for c in convs]


def test_broken_template_is_a_data_error(tokenizers):
    from types import SimpleNamespace

    from lora_data import DataError

    tok = SimpleNamespace(chat_template="{% for m in messages %}{{ m['content'] }", eos_token="<|im_end|>",
                          special_tokens_map={}, added_tokens_decoder={})  # the template has an unclosed tag
    with pytest.raises(DataError, match=r"tokenizer\.chat_template: the chat template does not compile"):
        Renderer(tok)


def test_a_system_message_the_template_leaves_out_is_named(tokenizers):
    """Mistral-Nemo writes the system prompt only before a final user turn: a training record would lose it."""
    r = Renderer(tokenizers["plain"])
    r._template = r._template.environment.from_string(
        "{% for m in messages %}{% if m.role == 'user' %}[INST]{% if loop.last and messages[0].role == 'system' %}"
        "{{ messages[0].content }}\n\n{% endif %}{{ m.content }}[/INST]{% elif m.role == 'assistant' %}{{ m.content }}"
        "{{ eos_token }}{% endif %}{% endfor %}")
    (got,) = r.render_batch([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4"}]])
    assert isinstance(got, RenderError) and got.field == "messages[0].content"
    assert "leaves this system message out of the conversation" in str(got)
