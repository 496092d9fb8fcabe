"""`lora-cli chat ADAPTER_DIR`: base (from adapter_config.json) + adapter answer a --prompt, or stdin lines until EOF."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from lora_cli.main import main


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_qwen2_dir):
    """A LoRA with non-zero weights on the tiny Qwen2 (so it changes the answers), saved with the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_qwen2_dir).save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_qwen2_dir)
    return out


def _greedy(base, adapter, conversation: list[dict], n: int) -> str:
    """The answer computed directly with transformers + PEFT (the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_prompt_answers_once_with_base_and_adapter(adapter_dir, tiny_qwen2_dir):
    res = CliRunner().invoke(main, ["chat", str(adapter_dir), "--prompt", "what is the capital of france",
                                    "--max-new-tokens", "8"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    expected = _greedy(tiny_qwen2_dir, adapter_dir, [{"role": "user", "content": "what is the capital of france"}], 8)
    assert expected and res.stdout.strip() == expected


def test_stdin_answers_each_line_with_the_conversation_and_exits_on_eof(adapter_dir, monkeypatch):
    from lora_cli import chat

    seen = []
    reply = chat.Chat.reply

    def spy(self, text, **kw):
        answer = reply(self, text, **kw)
        seen.append((list(self.messages), answer))
        return answer

    monkeypatch.setattr(chat.Chat, "reply", spy)
    res = CliRunner().invoke(main, ["chat", str(adapter_dir), "--max-new-tokens", "4"],
                             input="hello there\n\nwhat is the sum\n", catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(seen) == 2  # the blank line is skipped; EOF ends the chat
    assert [m["role"] for m in seen[1][0]] == ["user", "assistant", "user", "assistant"]
    assert seen[1][0][0]["content"] == "hello there" and seen[1][0][2]["content"] == "what is the sum"
    assert res.stdout.splitlines() == [line for _, a in seen for line in a.splitlines()]


def test_a_directory_without_an_adapter_is_one_line(tmp_path):
    res = CliRunner().invoke(main, ["chat", str(tmp_path), "--prompt", "hi"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [f"error: {tmp_path}: no adapter_config.json there; pass a run's "
                                               "output directory (the `adapter:` line that `lora-cli train` printed)"]


def test_an_unfinished_final_save_is_refused_in_one_line(tmp_path, adapter_dir):
    """A run whose final save did not finish may still hold an earlier run's whole adapter: chat refuses it."""
    import shutil

    from lora_runtime.checkpoint import FINAL_INCOMPLETE

    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run)
    (run / FINAL_INCOMPLETE).write_text("{}")
    res = CliRunner().invoke(main, ["chat", str(run), "--prompt", "hi"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith(f"error: {run}: the final adapter's save did not finish")


def test_a_stopped_run_names_its_newest_checkpoint(tmp_path, adapter_dir):
    import shutil

    from lora_runtime import checkpoint

    tmp = checkpoint.staging_dir(checkpoint.checkpoints_dir(tmp_path / "run"), 4)
    shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
    saved = checkpoint.commit(tmp, 4)
    res = CliRunner().invoke(main, ["chat", str(tmp_path / "run"), "--prompt", "hi"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"error: {tmp_path / 'run'}: no final adapter there (the run stopped before its end, or ran with "
        f"save_model=False); its newest complete checkpoint is {saved}: pass that"]


def test_a_missing_base_or_a_template_refusing_the_system_turn_is_one_line(tmp_path, adapter_dir, monkeypatch):
    res = CliRunner().invoke(main, ["chat", str(adapter_dir), "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert res.exit_code == 1 and res.output == f"error: --model {tmp_path / 'nope'}: no such directory\n"
    import shutil

    gemma_like = tmp_path / "adapter"
    shutil.copytree(adapter_dir, gemma_like)
    config = json.loads((gemma_like / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (gemma_like / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (gemma_like / name).unlink(missing_ok=True)
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model first"))
    res = CliRunner().invoke(main, ["chat", str(gemma_like), "--system", "Be brief", "--prompt", "hi"])
    assert res.exit_code == 1 and res.output == ("error: the chat template refuses this conversation (--system: does "
                                                 "it take a system message?): System role not supported\n")
