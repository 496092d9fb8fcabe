"""One conversation → the text the model's own chat template produces, plus the character spans to train on.

The template is applied once per record. To find where each message's content sits in that text, the template is
also rendered (once per sequence of roles, cached) with a sentinel in place of every content: the pieces between
sentinels are the template's scaffolding. The real text is then parsed as scaffold₀ content₀ scaffold₁ content₁ …,
which is exact for any template that inserts content verbatim, trimmed (Llama-3 trims) or JSON-escaped (a tool result
written with `| tojson`). The span of an assistant message is its content plus the end-of-turn marker that the
template writes right after it (the special token that starts the next scaffold piece: `<|im_end|>` for ChatML,
`<|eot_id|>` for Llama-3, EOS for the default template; EOS after whitespace, as Llama-2 writes it, with that
whitespace):

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
                                                     ^^^^^^^^^^^^^^^^  ← the only span with loss

An assistant turn with output keys (`tool_calls`, `reasoning_content`: `OUTPUT_KEYS`) is trained as the model writes
it: what the template adds after the conversation before it rendered with the generation prompt (`Renderer._turn`).
Where the template writes an earlier turn otherwise once later messages follow (Qwen3 drops its reasoning), what the
scaffold holds next to it beyond the scaffold without those keys is (`Renderer._beyond_bare`), where no other empty
message sits between the contents around it. An empty content that the template renders differently from a sentinel
(a newline before a tool call only after some content) is left in place and not cut at: first the answers', then any.

A tokenizer without a chat template gets `templates.DEFAULT_CHAT_TEMPLATE` (documented there).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import sandbox
from .errors import DataError
from .fingerprint import template_source
from .templates import DEFAULT_CHAT_TEMPLATE

_SENTINEL = "\ue000{}\ue001"  # private-use code points: never produced by a template, never trimmed
_SEP = "\ue002"  # ends each conversation when a whole chunk is rendered in one template call


class RenderError(DataError):
    """The template failed on a record, ran past its limit (`code` "render_limit"), or changed a message's content
    in a way we cannot locate: reported per record, never silent."""

    def __init__(self, message: str, *, field: str | None = None, code: str = "render_error") -> None:
        self.code = code
        super().__init__(message, field=field)


@dataclass(frozen=True, slots=True)
class Rendered:
    """The rendered `text`, the [start, end) character `spans` whose tokens carry loss, and the fields of reasoning
    the template leaves out of the text (`left_out`: not trained)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    left_out: tuple[str, ...] = ()


class Renderer:
    """Renders records with `tokenizer`'s chat template (or the default) and locates the assistant spans."""

    def __init__(self, tokenizer: Any, *, train_on_inputs: bool = False) -> None:
        template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        if isinstance(template, dict):  # named templates: "default" is the one apply_chat_template uses
            template = template.get("default") or next(iter(template.values()))
        self.template_source = template_source(tokenizer)
        self.train_on_inputs = train_on_inputs
        try:
            self._template = sandbox.compile_template(template)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise DataError(f"the chat template does not compile: {e}", field="tokenizer.chat_template") from None
        try:  # a template that cannot sit inside a loop (e.g. uses {% extends %}) is rendered one record at a time
            self._batch_template = sandbox.compile_template(
                "{% for messages in lora_data_batch %}" + template + _SEP + "{% endfor %}")
        except Exception:
            self._batch_template = None
        specials = {k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)}
        started = datetime.now()  # one date for the whole run: a prepare that passes midnight renders one text per role
        self._kwargs: dict[str, Any] = {"add_generation_prompt": False, **specials, "strftime_now": started.strftime}
        eos = getattr(tokenizer, "eos_token", None)
        markers = {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        self._markers = sorted(markers | ({eos} if eos else set()), key=len, reverse=True)
        self._eos = eos or ""
        self._scaffolds: dict[tuple, _Scaffold] = {}

    def text(self, messages: list[dict], context: dict[str, Any] | None = None, generation_prompt: bool = False
             ) -> str:
        """The template's text of `messages`, with a record's own variables (`records.template_context`)."""
        kwargs = self._kwargs if not (context or generation_prompt) else {
            **self._kwargs, **{k: v for k, v in (context or {}).items() if k not in _FIXED},
            "add_generation_prompt": generation_prompt}
        return sandbox.render(self._template, messages=messages, **kwargs)

    def texts(self, batch: list[list[dict]]) -> list[str] | None:
        """Render a whole chunk in one template call (5× faster than one call each); None if that is not exact."""
        if self._batch_template is None:
            return None
        try:
            limit = sandbox.TIME_LIMIT + 0.002 * len(batch)
            out = sandbox.render(self._batch_template, time_limit=limit, lora_data_batch=batch,
                                 **self._kwargs).split(_SEP)
        except Exception:  # a template error or limit in some record: the caller renders one by one and reports it
            return None
        if len(out) != len(batch) + 1 or out[-1] or (batch and out[0] != self.text(batch[0])):
            return None
        return out[:-1]

    def render_batch(self, batch: list[list[dict]], contexts: list[dict[str, Any]] | None = None
                     ) -> list[Rendered | RenderError]:
        """`render` for a chunk (`contexts`: each record's template variables, if any); a record that cannot be
        rendered gives its RenderError in place. Records without variables of their own are rendered in one call."""
        contexts = contexts or [{}] * len(batch)
        alone = [i for i, c in enumerate(contexts) if not c]
        texts = dict(zip(alone, self.texts([batch[i] for i in alone]) or (), strict=False))
        out: list[Rendered | RenderError] = []
        for i, messages in enumerate(batch):
            try:
                out.append(self.render(messages, text=texts.get(i), context=contexts[i]))
            except RenderError as e:
                out.append(e)
            except sandbox.TemplateLimitError as e:
                out.append(RenderError(str(e), code="render_limit"))
            except Exception as e:  # the template raised (raise_exception) or failed on this record
                out.append(RenderError(f"the chat template failed on this record: {e}"))
        return out

    def _scaffold(self, messages: list[dict], context: dict[str, Any] | None, hide_empty: str) -> _Scaffold:
        """The template's text with a sentinel for each content, cut at the sentinels (see `_Scaffold`). The empty
        contents `hide_empty` names ("assistant": of assistant turns; "all") stay as they are and are not cut at: for
        templates that render an empty content differently (Qwen3 writes a newline before a tool call only after some
        content)."""
        shown = tuple(i for i, m in enumerate(messages) if not _hidden(m, hide_empty))
        plain = not context and not hide_empty and all(len(m) == 2 for m in messages)  # the scaffold follows the roles
        key = tuple(m["role"] for m in messages)
        if plain and key in self._scaffolds:
            return self._scaffolds[key]
        probe = [{**m, "content": _SENTINEL.format(i)} if i in shown else m for i, m in enumerate(messages)]
        text = self.text(probe, context)
        pieces, pos = [], 0
        for i in shown:
            at = text.find(_SENTINEL.format(i), pos)
            if at < 0 and messages[i].get("tool_calls") and messages[i]["content"]:
                raise RenderError("the chat template leaves out the content of this turn with tool_calls: it would "
                                  "not be trained; leave the content empty, or use a template that writes both (GPT-OSS "
                                  "writes it only while no final answer follows: a record ending with this turn "
                                  "trains it)", field=f"messages[{i}].content")
            if text.count(_SENTINEL.format(i)) == 0 and messages[i]["role"] == "system" and messages[i]["content"]:
                raise RenderError("the chat template leaves this system message out of the conversation (Mistral-Nemo "
                                  "writes it only where the conversation ends on a user turn): it would not be in "
                                  "training; pass a chat_template= that always writes it, or leave it out",
                                  field=f"messages[{i}].content")
            if at < 0 or text.count(_SENTINEL.format(i)) != 1:
                raise RenderError(f"the chat template does not render message {i} exactly once; it cannot be masked",
                                  field=f"messages[{i}]")
            pieces.append(text[pos:at])
            pos = at + len(_SENTINEL.format(i))
        pieces.append(text[pos:])
        result = _Scaffold(tuple(pieces), tuple(self._marker_at(p) for p in pieces[1:]), shown)
        if plain:
            self._scaffolds[key] = result
        return result

    def _marker_at(self, piece: str) -> str:
        """The end-of-turn text at the start of `piece`: a special token right after the content, or EOS after
        whitespace (Llama-2's `content + ' ' + eos_token`)."""
        found = next((m for m in self._markers if piece.startswith(m)), "")
        gap = len(piece) - len(piece.lstrip())
        if not found and gap and self._eos and piece.startswith(self._eos, gap):
            return piece[:gap + len(self._eos)]
        return found

    def render(self, messages: list[dict], text: str | None = None, context: dict[str, Any] | None = None
               ) -> Rendered:
        """Render `messages` (with `context`'s variables); spans cover what each assistant turn writes: its content,
        what the template writes for its other keys (tool calls, reasoning), and its end-of-turn marker (or all
        text)."""
        text = self.text(messages, context) if text is None else text
        if not text.strip():
            raise RenderError("the chat template renders this record as no text: nothing to train on (does it accept "
                              "these roles in this order?)")
        left_out = _left_out(messages, text)
        if self.train_on_inputs:
            return Rendered(text, ((0, len(text)),), left_out)
        try:
            return Rendered(text, self._located(messages, context, text), left_out)
        except Exception:
            written = self._as_written(messages, context, text)
            if written is None:
                raise
        try:
            return Rendered(text, self._located(written, context, text), left_out)
        except Exception:
            pass
        return Rendered(text, self._located(messages, context, text))  # its own error, as without the retry

    def _located(self, messages: list[dict], context: dict[str, Any] | None, text: str
                 ) -> tuple[tuple[int, int], ...]:
        try:
            return self._spans(messages, context, text, hide_empty="")
        except Exception as e:  # a RenderError, or the template failing on a sentinel in place of an empty content
            # then with the empty answers left as they are, and failing that every empty content
            hidden = {h: {i for i, m in enumerate(messages) if _hidden(m, h)} for h in ("assistant", "all")}
            if not hidden["all"]:
                raise
            again: Exception = e
            for hide in ("assistant", "all"):
                if hidden[hide] and (hide == "assistant" or hidden["all"] != hidden["assistant"]):
                    try:
                        return self._spans(messages, context, text, hide_empty=hide)
                    except RenderError as later:
                        again = later
            raise (e if _first_says_more(e, messages) else again) from None

    def _as_written(self, messages: list[dict], context: dict[str, Any] | None, text: str) -> list[dict] | None:
        """`messages` as the template writes them, where that renders the same text: without the reasoning it leaves
        out (GPT-OSS drops a tool call's thinking once a final answer follows; DeepSeek-R1 and Qwen3 an earlier
        answer's `<think>...</think>` written into its content), which cannot be trained here, and with reasoning
        written into an answer's content as `reasoning_content` where the template writes it from there (Qwen3's
        last turn). None where nothing changes."""
        out, changed = list(messages), False
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            keys = tuple(k for k in REASONING_KEYS if m.get(k))
            bare = _without(m, keys, null_as_empty=False)
            if keys and self._same_text([*out[:i], bare, *out[i + 1:]], context, text):
                m, changed = bare, True
            inline = _inline_thought(m["content"])
            if inline is not None:
                thought, answer = inline
                moved = {**m, "content": answer.lstrip("\n"), "reasoning_content": thought.strip("\n")}
                answers = dict.fromkeys([answer, answer.lstrip("\n"), answer.strip() and answer])  # "" for blank
                alone = [{**m, "content": a} for a in answers]
                # only where the template writes this turn's content at all: content it leaves out (Llama-3.1's beside
                # tool calls) is refused, `<think>` or not
                writes = self._writes_content([*out[:i], m, *out[i + 1:]], i, context)
                for written in (*alone, moved) if writes else ():
                    if not written.keys() & set(keys) and self._same_text(
                            [*out[:i], written, *out[i + 1:]], context, text):
                        m, changed = written, True
                        break
            out[i] = m
        return out if changed else None

    def _spans(self, messages: list[dict], context: dict[str, Any] | None, text: str, hide_empty: str
               ) -> tuple[tuple[int, int], ...]:
        scaffold = self._scaffold(messages, context, hide_empty)
        pieces, shown = scaffold.pieces, scaffold.shown
        if not text.startswith(pieces[0]):
            raise RenderError("the chat template output depends on message content; it cannot be masked")
        pos, starts, spans = len(pieces[0]), [0], []
        located: dict[int, tuple[int, int]] = {}  # message → its content's [start, end) in text
        for k, i in enumerate(shown):
            content = messages[i]["content"] or ""
            end = _match_content(text, pos, content, pieces[k + 1])
            if end is None and k + 1 < len(shown) and content.strip() and _match_content(
                    text, pos, content, "") is not None:
                raise RenderError(f"the chat template writes text between messages[{i}] and this content that "
                                  "depends on one of them (reasoning taken out of this answer, say); cannot locate "
                                  "the turn", field=f"messages[{shown[k + 1]}].content")
            if end is None:
                raise RenderError("the chat template changes this content beyond trimming whitespace; cannot locate "
                                  "the turn", field=f"messages[{i}].content")
            if messages[i]["role"] == "assistant":
                spans.append((pos, end + len(scaffold.eot[k])))
            located[i] = (pos, end)
            starts.append(end)
            pos = end + len(pieces[k + 1])
        extras = [i for i, m in enumerate(messages) if _writes_more(m)]
        if not extras:
            return tuple(spans)
        for i in extras:
            calls = messages[i].get("tool_calls")
            if calls and not self._writes_tool_calls(messages, i, context, text):
                raise RenderError("the chat template does not write this turn's tool_calls, so they would not be "
                                  "trained: use a chat template that renders tool calls (chat_template=...), or leave "
                                  "them out", field=f"messages[{i}].tool_calls")
            if isinstance(calls, list) and len(calls) > 1 and self._same_text(
                    [*messages[:i], {**messages[i], "tool_calls": calls[:-1]}, *messages[i + 1:]], context, text):
                raise RenderError(f"the chat template writes only some of this turn's {len(calls)} tool calls (GPT-OSS "
                                  "writes the first); the rest would not be trained: give each call a turn of its own",
                                  field=f"messages[{i}].tool_calls[{len(calls) - 1}]")
        windows = {i: (max((e for j, (_, e) in located.items() if j < i), default=0),
                       min((a for j, (a, _) in located.items() if j > i), default=len(text))) for i in extras}
        turns = _placed(text, {i: self._turn(messages, i, context) for i in extras}, windows)
        found, missed = [], []
        for i, turn in turns.items():  # a turn found where another one is: neither is known
            if turn and not any(t and t[0] < turn[1] and turn[0] < t[1] for j, t in turns.items() if j != i):
                found.append(turn)
            else:
                missed.append(windows[i])
        if missed:  # a turn the template writes otherwise once later messages follow: by the scaffold, there
            bare = self._beyond_bare(messages, context, hide_empty, scaffold, starts)
            found += [(a, b) for a, b in bare if any(lo <= a < hi for lo, hi in missed)]
        return _merged(spans + found)

    def _writes_content(self, messages: list[dict], i: int, context: dict[str, Any] | None) -> bool:
        """Whether the template writes message `i`'s content into this conversation (False where it refuses it)."""
        probe = _SENTINEL.format(i)
        try:
            return probe in self.text([*messages[:i], {**messages[i], "content": probe}, *messages[i + 1:]], context)
        except Exception:
            return False

    def _same_text(self, messages: list[dict], context: dict[str, Any] | None, text: str) -> bool:
        """Whether `messages` render as `text` (False where the template refuses them)."""
        try:
            return self.text(messages, context) == text
        except Exception:
            return False

    def _writes_tool_calls(self, messages: list[dict], i: int, context: dict[str, Any] | None, text: str) -> bool:
        """Whether the record's text changes with turn `i`'s tool_calls left out; where the template refuses that
        conversation (Mistral's roles no longer alternate), whether the text of messages[: i + 1] does; True where
        neither renders."""
        without = _without(messages[i], ("tool_calls",))
        try:
            return text != self.text([*messages[:i], without, *messages[i + 1:]], context)
        except Exception:
            pass
        try:
            return self.text(messages[: i + 1], context) != self.text([*messages[:i], without], context)
        except Exception:
            return True

    def _turn(self, messages: list[dict], i: int, context: dict[str, Any] | None) -> tuple[int, str] | None:
        """Assistant turn `i` as the model writes it, and where it starts after the conversation before it: what the
        template adds to that conversation for messages[: i + 1], up to its last non-space (reasoning, content, tool
        calls, end-of-turn token), less what the generation prompt already holds of it (the assistant header;
        Qwen3-2507's `<think>`), or, for a template that ignores add_generation_prompt, less the header it writes
        before the same turn's content without its output keys. None where that cannot be told."""
        try:
            before = self.text(messages[:i], context)
            prompt = self.text(messages[:i], context, generation_prompt=True)
            whole = self.text(messages[: i + 1], context)
            plain = [*messages[:i], _without(messages[i], OUTPUT_KEYS) | {"content": _SENTINEL.format(i)}]
            probe = self.text(plain, context) if prompt == before else ""
        except Exception:  # a template that refuses the shorter conversation
            return None
        if not whole.startswith(before):
            return None
        turn = whole[len(before):].rstrip()
        if prompt != before:  # the generation prompt: its start the turn shares is prompt, not trained
            added = prompt[len(before):] if prompt.startswith(before) else ""
            skip = len(added) if turn.startswith(added) else self._whole_units(added, turn, _common_prefix(added, turn))
        else:
            at = probe.find(_SENTINEL.format(i))
            header = probe[len(before):at] if at >= 0 and probe.startswith(before) else ""
            if header.strip() and not turn.startswith(header):  # some of it may be the turn's: by the scaffold
                return None
            skip = len(header) if turn.startswith(header) else 0  # a space before a plain turn's content only
        return (len(before) + skip, turn[skip:]) if turn[skip:].strip() else None

    def _beyond_bare(self, messages: list[dict], context: dict[str, Any] | None, hide_empty: str,
                     scaffold: _Scaffold, starts: list[int]) -> list[tuple[int, int]]:
        """Spans of what the scaffold holds next to an assistant turn beyond the scaffold of the same conversation
        with those turns' output keys left out, for a template whose earlier turns render otherwise once later
        messages follow (Qwen3 drops an earlier turn's reasoning)."""
        bare = [_without(m, OUTPUT_KEYS) if _writes_more(m) else m for m in messages]
        try:
            without_pieces = self._scaffold(bare, context, hide_empty).pieces
        except Exception as e:
            raise RenderError(f"cannot locate what the chat template writes for the tool calls or reasoning: it "
                              f"fails on the conversation without them ({e})") from None
        pieces, shown, spans = scaffold.pieces, scaffold.shown, []
        ends = {e for e in scaffold.eot if e} | ({self._eos} if self._eos else set())
        for k, (piece, without) in enumerate(zip(pieces, without_pieces, strict=True)):
            around = range(shown[k - 1] if k else 0, (shown[k] if k < len(shown) else len(messages) - 1) + 1)
            if piece == without or not any(messages[j]["role"] == "assistant" for j in around):
                continue
            inside = range(shown[k - 1] + 1 if k else 0, shown[k] if k < len(shown) else len(messages))
            if len(inside) > 1 or any(messages[j]["role"] != "assistant" for j in inside):  # whose part is whose?
                culprit = next((j for j in inside if messages[j]["role"] != "assistant"), inside[-1])
                raise RenderError("cannot tell what the chat template writes for each of the turns with tool calls "
                                  f"or reasoning among messages {around[0]}..{around[-1]} (empty contents between "
                                  "them): give the empty tool result or turn some content",
                                  field=f"messages[{culprit}].content")
            a = _common_prefix(piece, without)
            a = min(self._in_marker(piece, a)[0], self._in_marker(without, a)[0])  # never half a special token
            tail = _common_prefix(piece[a:][::-1], without[a:][::-1])
            tail -= max(self._in_marker(piece, len(piece) - tail)[1] - (len(piece) - tail),
                        self._in_marker(without, len(without) - tail)[1] - (len(without) - tail))
            b = len(piece) - tail
            if b <= a:
                continue
            if k < len(shown) and messages[shown[k]]["role"] == "assistant":
                b = len(piece)  # before its content: the reasoning and the tags that close it, up to the answer
            else:  # after a turn: it ends at its end-of-turn token, before any header of the next message
                cut = [at for at in (piece.find(e, a) for e in ends) if at >= 0]
                b = min([b, *cut])
            end = next((e for e in ends if piece.startswith(e, b)), "")
            spans.append((starts[k] + a, starts[k] + b + len(end)))
        return spans

    def _whole_units(self, text: str, turn: str, shared: int) -> int:
        """`shared`, or where text[:shared] last ends after a special token or a newline where `shared` cuts a word
        of `turn` or follows only punctuation: the generation prompt's `<think>` shares `<t` with `<tool_call>`,
        while `<|im_start|>assistant` before the prompt's newline is a whole header."""
        ends = [0, *(k + 1 for k, c in enumerate(text[:shared]) if c == "\n")]
        for m in self._markers:
            at = text.find(m, 0, shared)
            while at >= 0 and at + len(m) <= shared:
                ends.append(at + len(m))
                at = text.find(m, at + 1, shared)
        unit = max(ends)
        in_word = 0 < shared < len(turn) and turn[shared - 1].isalnum() and turn[shared].isalnum()
        return unit if in_word or not any(c.isalnum() for c in text[unit:shared]) else shared

    def _in_marker(self, text: str, at: int) -> tuple[int, int]:
        """The special token of `text` that position `at` falls inside, as (start, end); else (at, at)."""
        for m in self._markers:
            start = text.rfind(m, max(0, at - len(m) + 1), at + len(m) - 1)
            if 0 <= start < at < start + len(m):
                return start, start + len(m)
        return at, at


@dataclass(frozen=True, slots=True)
class _Scaffold:
    """The template's text of a conversation with a sentinel for each `shown` message's content, cut at them:
    `pieces[k]` comes before message `shown[k]`'s content (the last piece after all), and `eot[k]` is the end-of-turn
    marker at the start of `pieces[k + 1]`."""

    pieces: tuple[str, ...]
    eot: tuple[str, ...]
    shown: tuple[int, ...]


_FIXED = {"messages", "add_generation_prompt", "lora_data_batch"}  # never taken from a record's template variables
# what an assistant turn writes besides its content, where chat templates read it
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_THINK_START, _THINK_END = "<think>", "</think>"  # reasoning written into an answer's content (DeepSeek-R1, Qwen3)
OUTPUT_KEYS = ("tool_calls", *REASONING_KEYS, "function_call")


def _first_says_more(e: Exception, messages: list[dict]) -> bool:
    """Whether the error of locating with every content cut at is the one to report, rather than the error with the
    empty contents left in place: not where the template failed on a sentinel in place of an empty content, or the
    error names an empty content (a sentinel renders otherwise than nothing)."""
    named = re.match(r"messages\[(\d+)\]", getattr(e, "field", None) or "")
    return isinstance(e, RenderError) and not (named and _blank(messages[int(named[1])]))


def _left_out(messages: list[dict], text: str) -> tuple[str, ...]:
    """The fields of the assistant turns' reasoning (a reasoning key, or `<think>...</think>` in the content) that
    `text` does not hold: the template leaves them out (GPT-OSS, a call's thinking once a final answer follows;
    DeepSeek-R1, every answer's; Qwen3, every turn's but the last), so they are not trained. A thought written in
    several turns counts as held as often as `text` holds it, the earliest turns' missing first (one message's
    copies under several keys count once).

    >>> _left_out([{"role": "assistant", "content": "<think>add</think>4"}] * 2, "<think>add</think>4 4")
    ('messages[0].content',)
    """
    thoughts: list[tuple[int, str, str]] = []  # (message, field, thought)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        found = [(k, m[k]) for k in REASONING_KEYS if isinstance(m.get(k), str)]
        inline = _inline_thought(m["content"])
        if inline is not None:
            found.append(("content", inline[0]))
        thoughts += [(i, f"messages[{i}].{k}", thought.strip()) for k, thought in found if thought.strip()]
    missing: set[tuple[int, str]] = set()
    for thought in {t for _, _, t in thoughts}:
        turns = list(dict.fromkeys(i for i, _, t in thoughts if t == thought))
        missing.update((i, thought) for i in turns[:max(0, len(turns) - text.count(thought))])
    return tuple(field for i, field, t in thoughts if (i, t) in missing)


def _inline_thought(content: str | None) -> tuple[str, str] | None:
    """(reasoning, answer) of a content that writes its reasoning inline, `<think>reasoning</think>answer`; else None.

    >>> _inline_thought("<think>add</think>4"), _inline_thought("4")
    (('add', '4'), None)
    """
    if not content or _THINK_END not in content:
        return None
    return content.split(_THINK_END)[0].split(_THINK_START)[-1], content.split(_THINK_END)[-1]


def _hidden(m: dict, hide_empty: str) -> bool:
    """Whether `_scaffold` leaves message `m`'s content in place (see there)."""
    return bool(hide_empty) and _blank(m) and (hide_empty == "all" or m["role"] == hide_empty)


def _blank(m: dict) -> bool:
    """An empty content; beside tool calls, whitespace alone too (Qwen3.5 and GLM trim it away there)."""
    return not ((m["content"] or "").strip() if m.get("tool_calls") else m["content"])


def _writes_more(m: dict) -> bool:
    return m["role"] == "assistant" and any(m.get(k) for k in OUTPUT_KEYS)


def _without(m: dict, keys: tuple[str, ...], null_as_empty: bool = True) -> dict:
    """Message `m` without `keys`; with `null_as_empty`, a null content as "" (a template that concatenates content
    fails on null)."""
    kept = {k: v for k, v in m.items() if k not in keys}
    return kept | {"content": m["content"] or ""} if null_as_empty else kept


def _placed(text: str, turns: dict[int, tuple[int, str] | None], windows: dict[int, tuple[int, int]]
            ) -> dict[int, tuple[int, int] | None]:
    """Each turn's [start, end) in `text`: where the conversation before it ends, else found in message order in its
    window (between the contents around it), where the window holds its text as many times as the turns there write
    it (Mistral moves the tool list to the last user turn; two identical calls with empty results between them).
    None where it is not found so."""
    placed: dict[int, tuple[int, int] | None] = {}
    searched_from: dict[tuple[int, int], int] = {}
    for i, turn in sorted(turns.items()):
        lo, hi = windows[i]
        if turn is None:
            placed[i] = None
            continue
        start, written = turn
        if not (text.startswith(written, start) and lo <= start <= hi):
            alike = sum(1 for j, t in turns.items() if t and t[1] == written and windows[j] == windows[i])
            start = text.find(written, searched_from.get(windows[i], lo), hi)
            if start < 0 or text.count(written, lo, hi) != alike:
                placed[i] = None
                continue
        placed[i] = (start, start + len(written))
        searched_from[windows[i]] = start + len(written)
    return placed


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _merged(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted spans with the touching or overlapping ones joined.

    >>> _merged([(8, 9), (0, 3), (3, 5)])
    ((0, 5), (8, 9))
    """
    out: list[list[int]] = []
    for a, b in sorted(x for x in spans if x[1] > x[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _match_content(text: str, pos: int, content: str, following: str) -> int | None:
    """End of `content` (verbatim, trimmed, or JSON-escaped as `| tojson` writes a tool result inside its quotes) at
    `pos`, if the next scaffold piece follows it."""
    escaped = json.dumps(content, ensure_ascii=False)[1:-1]
    for candidate in (content, content.strip(), content.rstrip(), content.lstrip(), escaped):
        end = pos + len(candidate)
        if text.startswith(candidate, pos) and text.startswith(following, end):
            return end
    return None
