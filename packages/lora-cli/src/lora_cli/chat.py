"""`lora-cli chat ADAPTER_DIR`: talk to a trained adapter (base + LoRA through transformers and PEFT, CPU or GPU).

With --prompt it answers once and exits (scripts, tests); otherwise it reads one user turn per stdin line until EOF,
keeping the conversation, and answers each through the tokenizer's chat template. Decoding is greedy unless
--temperature is above 0, so the same prompt gives the same answer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click


class ChatError(OSError):
    """A problem with the adapter or the base model the user can fix (reported as one line, exit code 1)."""


def base_model_of(adapter_dir: Path, model: str | None) -> str:
    """--model when given, else the adapter's base_model_name_or_path."""
    from lora_runtime import checkpoint
    from lora_runtime.merge import adapter_base

    from lora_cli.options import check_model_path

    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        newest = checkpoint.newest_complete(checkpoint.checkpoints_dir(adapter_dir))
        if newest is not None:
            raise ChatError(f"{adapter_dir}: no final adapter there (the run stopped before its end, or ran with "
                            f"save_model=False); its newest complete checkpoint is {newest}: pass that")
        raise ChatError(f"{adapter_dir}: no adapter_config.json there; pass a run's output directory (the "
                        "`adapter:` line that `lora-cli train` printed)")
    if model:
        check_model_path(model)
        return model
    base = adapter_base(adapter_dir)
    if base is None:
        raise ChatError(f"{config}: no base_model_name_or_path; pass --model BASE")
    check_model_path(base, f"{config}: base_model_name_or_path (pass --model BASE)")
    return base


class Chat:
    """A loaded base + adapter and the conversation so far."""

    def __init__(self, adapter_dir: Path, base: str, *, device: str | None = None, system: str | None = None):
        import torch
        from lora_runtime.checkpoint import check_adapter
        from lora_runtime.merge import load_adapted
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        check_adapter(adapter_dir)  # torn, corrupted, or an unfinished final save: one error naming what to use

        hf_logging.disable_progress_bar()  # the weight-loading bar would land between the turns
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        has_tokenizer = any((adapter_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir) if has_tokenizer else base)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ChatError(f"the tokenizer of {adapter_dir if has_tokenizer else base} has no chat template")
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self._prompt([*self.messages, {"role": "user", "content": "hi"}], opening=True)  # before the model loads
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        self.model = load_adapted(model, adapter_dir, base).to(self.device).eval()

    def _prompt(self, messages: list[dict[str, str]], opening: bool = False) -> Any:
        """The template's token ids of `messages` + the generation prompt; a template that refuses them (Gemma's takes
        no system turn: `opening` says so) is a ChatError."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)
        except TemplateError as e:
            system = " (--system: does it take a system message?)" if opening and self.messages else ""
            raise ChatError(f"the chat template refuses this conversation{system}: {e}") from None

    def reply(self, text: str, *, max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        """Answer one user turn (added, with the answer, to the conversation)."""
        import torch

        self.messages.append({"role": "user", "content": text})
        encoded: Any = self._prompt(self.messages)
        inputs = {k: v.to(self.device) for k, v in encoded.items()}
        sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature} if temperature > 0
                                    else {"do_sample": False})
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        answer = str(self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


@click.command("chat", context_settings={"max_content_width": 120})
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_path", default=None,
              help="base model (hub id or directory); default: base_model_name_or_path in adapter_config.json")
@click.option("--prompt", default=None, help="answer this one prompt and exit (default: read stdin lines until EOF)")
@click.option("--system", default=None, help="a system message opening the conversation")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 decodes greedily (the same prompt, the same answer)")
def chat_command(adapter_dir: Path, model_path: str | None, prompt: str | None, system: str | None,
                 max_new_tokens: int, temperature: float) -> None:
    """Talk to a trained adapter (--prompt once, or stdin until EOF).

    ADAPTER_DIR is a run's output directory; the base model is the one in its adapter_config.json unless --model
    names another.
    """
    session = Chat(adapter_dir, base_model_of(adapter_dir, model_path), system=system)
    if prompt is not None:
        click.echo(session.reply(prompt, max_new_tokens=max_new_tokens, temperature=temperature))
        return
    stdin = sys.stdin  # CliRunner's input in tests
    interactive = bool(stdin.isatty())
    if interactive:
        click.echo("type a message and press Enter; Ctrl-D ends the chat", err=True)
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = stdin.readline()
        if not line:
            break
        if line.strip():
            click.echo(session.reply(line.strip(), max_new_tokens=max_new_tokens, temperature=temperature))
            sys.stdout.flush()
    if interactive:
        click.echo("", err=True)
