"""Chat templates compiled in jinja2's immutable sandbox, with a time and size limit on each render.

The environment is the one transformers' `apply_chat_template` uses (trim_blocks, lstrip_blocks, loop controls,
`{% generation %}` blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII), so the text is the
same; it is built here rather than borrowed from a private transformers function. A render that runs past
`time_limit` seconds (nested loops over `range`, say) or builds a string or list past `MAX_REPEAT` items with `*`
raises `TemplateLimitError` instead of hanging or filling memory.

>>> t = compile_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}")
>>> render(t, messages=[{"role": "user", "content": "Hi"}])
'user: Hi\\n'
>>> render(compile_template("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"),
...        time_limit=0.05)
Traceback (most recent call last):
  ...
lora_data.sandbox.TemplateLimitError: the chat template ran longer than 0.05 s (nested loops?)
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

TIME_LIMIT = 2.0  # seconds per record; real templates render in microseconds
MAX_REPEAT = 1 << 24  # items a `*` may build (string characters or list elements)
MAX_OUTPUT = 1 << 27  # characters one render may write (a record is at most 32 MiB)


class TemplateLimitError(Exception):
    """A render ran past its time limit or tried to build something huge."""


class _Clock(threading.local):
    deadline: float | None = None
    limit = 0.0
    calls = 0


_state = _Clock()


def _tick() -> None:
    """Called on every function call, attribute and item access and `*`/`**` of a render; reads the clock 1 in 64."""
    state = _state
    state.calls += 1
    if not state.calls & 63:
        _check(state)


def _check(state: _Clock) -> None:
    if state.deadline is not None and time.monotonic() > state.deadline:
        raise TemplateLimitError(f"the chat template ran longer than {state.limit:g} s (nested loops?)")


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers for transformers): renders the body."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call(__self, __context, __obj, *args, **kwargs):  # jinja's names: a template may pass obj=, context=
            _tick()
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj, attribute, _get=ImmutableSandboxedEnvironment.getattr):
            state = _state  # inlined _tick: this runs for every `x.y` of every render
            state.calls += 1
            if not state.calls & 63:
                _check(state)
            return _get(self, obj, attribute)

        def getitem(self, obj, argument, _get=ImmutableSandboxedEnvironment.getitem):
            state = _state
            state.calls += 1
            if not state.calls & 63:
                _check(state)
            return _get(self, obj, argument)

        def call_binop(self, context, operator, left, right):
            _tick()
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise TemplateLimitError(f"the chat template computes a power with exponent {right}")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                        raise TemplateLimitError(f"the chat template builds a sequence of {len(seq) * n:,} items")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Limited(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def compile_template(source: str):
    """A jinja2 Template; jinja2.TemplateSyntaxError (and friends) if `source` does not compile."""
    return _environment().from_string(source)


def render(template: Any, *, time_limit: float | None = None, **context: Any) -> str:
    """`template.render(**context)` bounded by `time_limit` seconds (default TIME_LIMIT; TemplateLimitError past it)."""
    limit = TIME_LIMIT if time_limit is None else time_limit
    _state.deadline, _state.limit = time.monotonic() + limit, limit
    try:
        text = template.render(**context)
    finally:
        _state.deadline = None
    if len(text) > MAX_OUTPUT:
        raise TemplateLimitError(f"the chat template wrote {len(text):,} characters")
    return text
