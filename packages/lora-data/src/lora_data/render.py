"""One conversation → the text the model's own chat template produces, plus the character spans to train on.

The template is applied once per record. To find where each message's content sits in that text, the template is
also rendered (once per sequence of roles, cached) with a sentinel in place of every content: the pieces between
sentinels are the template's scaffolding. The real text is then parsed as scaffold₀ content₀ scaffold₁ content₁ …,
which is exact for any template that inserts content verbatim or trimmed (Llama-3 trims). The span of an assistant
message is its content plus the end-of-turn marker that the template writes right after it (the special token that
starts the next scaffold piece: `<|im_end|>` for ChatML, `<|eot_id|>` for Llama-3, EOS for the default template; EOS
after whitespace, as Llama-2 writes it, with that whitespace):

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
                                                     ^^^^^^^^^^^^^^^^  ← the only span with loss

A tokenizer without a chat template gets `templates.DEFAULT_CHAT_TEMPLATE` (documented there).
"""

from __future__ import annotations

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
    """The rendered `text` and the [start, end) character `spans` whose tokens carry loss."""

    text: str
    spans: tuple[tuple[int, int], ...]


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
        self._scaffolds: dict[tuple, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def text(self, messages: list[dict]) -> str:
        return sandbox.render(self._template, messages=messages, **self._kwargs)

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

    def render_batch(self, batch: list[list[dict]]) -> list[Rendered | RenderError]:
        """`render` for a chunk; a record that cannot be rendered gives its RenderError in place."""
        texts = self.texts(batch)
        out: list[Rendered | RenderError] = []
        for i, messages in enumerate(batch):
            try:
                out.append(self.render(messages, text=None if texts is None else texts[i]))
            except RenderError as e:
                out.append(e)
            except sandbox.TemplateLimitError as e:
                out.append(RenderError(str(e), code="render_limit"))
            except Exception as e:  # the template raised (raise_exception) or failed on this record
                out.append(RenderError(f"the chat template failed on this record: {e}"))
        return out

    def _scaffold(self, messages: list[dict]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Scaffold pieces (len n+1) and, per message, the end-of-turn marker that follows it."""
        plain = all(len(m) == 2 for m in messages)  # only role + content: the scaffold depends on roles alone
        key = tuple(m["role"] for m in messages)
        if plain and key in self._scaffolds:
            return self._scaffolds[key]
        probe = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        text = self.text(probe)
        pieces, pos = [], 0
        for i in range(len(messages)):
            at = text.find(_SENTINEL.format(i), pos)
            if at < 0 or text.count(_SENTINEL.format(i)) != 1:
                raise RenderError(f"the chat template does not render message {i} exactly once; it cannot be masked",
                                  field=f"messages[{i}]")
            pieces.append(text[pos:at])
            pos = at + len(_SENTINEL.format(i))
        pieces.append(text[pos:])
        eot = tuple(self._marker_at(p) for p in pieces[1:])
        result = (tuple(pieces), eot)
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

    def render(self, messages: list[dict], text: str | None = None) -> Rendered:
        """Render `messages`; spans cover each assistant content + its end-of-turn marker (or all text)."""
        text = self.text(messages) if text is None else text
        if not text.strip():
            raise RenderError("the chat template renders this record as no text: nothing to train on (does it accept "
                              "these roles in this order?)")
        if self.train_on_inputs:
            return Rendered(text, ((0, len(text)),))
        pieces, eot = self._scaffold(messages)
        if not text.startswith(pieces[0]):
            raise RenderError("the chat template output depends on message content; it cannot be masked")
        pos, spans = len(pieces[0]), []
        for i, m in enumerate(messages):
            end = _match_content(text, pos, m["content"], pieces[i + 1])
            if end is None and i + 1 < len(messages) and m["content"].strip() and _match_content(
                    text, pos, m["content"], "") is not None:
                raise RenderError("the chat template writes text before this content that depends on it (reasoning "
                                  "taken out of the answer, say); cannot locate the turn",
                                  field=f"messages[{i + 1}].content")
            if end is None:
                raise RenderError("the chat template changes this content beyond trimming whitespace; cannot locate "
                                  "the turn", field=f"messages[{i}].content")
            if m["role"] == "assistant":
                spans.append((pos, end + len(eot[i])))
            pos = end + len(pieces[i + 1])
        return Rendered(text, tuple(spans))


def _match_content(text: str, pos: int, content: str, following: str) -> int | None:
    """End of `content` (verbatim or trimmed) at `pos`, if the next scaffold piece follows it."""
    for candidate in (content, content.strip(), content.rstrip(), content.lstrip()):
        end = pos + len(candidate)
        if text.startswith(candidate, pos) and text.startswith(following, end):
            return end
    return None
