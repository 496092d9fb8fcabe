"""merge_adapter: the merged model computes what base + adapter computes."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import build_model
from lora_runtime import merge_adapter


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj", "embed_tokens"], ["q_proj", "v_proj"]])
def test_a_tied_base_merges_as_it_trained(tmp_path, llama3_tokenizer_dir, targets):
    """With tie_word_embeddings, lm_head and embed_tokens share one weight: an adapter on either, merged into it,
    changed the other too (logits off by whole units). The merge unties them where one is adapted."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = build_model(tmp_path / "base", tokenizer_dir=llama3_tokenizer_dir, tied=True)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    merged_dir = merge_adapter(tmp_path / "adapter", base_dir, tmp_path / "merged")

    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    tied = json.loads((merged_dir / "config.json").read_text()).get("tie_word_embeddings")
    assert tied is (targets == ["q_proj", "v_proj"])  # left tied where neither embedding is adapted


def test_a_full_disk_during_the_merge_is_one_error_and_leaves_nothing(tmp_path, tiny_llama_dir, monkeypatch):
    import errno

    from lora_runtime.errors import CheckpointError
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedModel

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(CheckpointError, match=r"disk full \(No space left on device\) while writing the merged "
                                              r"model to .*merged; the partial write was removed"):
        merge_adapter(tmp_path / "adapter", tiny_llama_dir, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_merging_into_another_model_than_the_one_trained_says_so(tmp_path, llama3_tokenizer_dir, capsys):
    from lora_runtime.checkpoint import CONFIG_NAME, model_identity
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    trained = build_model(tmp_path / "trained", tokenizer_dir=llama3_tokenizer_dir, seed=0)
    other = build_model(tmp_path / "other", tokenizer_dir=llama3_tokenizer_dir, seed=1)
    adapter = tmp_path / "run"
    get_peft_model(AutoModelForCausalLM.from_pretrained(trained), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    (adapter / CONFIG_NAME).write_text(json.dumps({"model_path": str(trained),
                                                   "resolved": {"model": model_identity(trained)}}))
    merge_adapter(adapter, trained, tmp_path / "m1")
    assert "warning" not in capsys.readouterr().out
    merge_adapter(adapter, other, tmp_path / "m2")
    assert (f"warning: {other} is not the model {adapter} was trained on ({trained}: its config.json or weights "
            "differ); merging into it anyway") in capsys.readouterr().out


@pytest.mark.parametrize(("init", "extra"), [
    ("pissa", {}), ("olora", {"use_rslora": True, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 16}})])
def test_an_adapter_whose_init_changed_the_base_is_saved_for_the_original_base(init, extra, tmp_path, tiny_llama_dir,
                                                                               llama_shards):
    """PiSSA and OLoRA train on W − s·B₀A₀. The final adapter is saved as a plain LoRA of rank 2r on W, which PEFT,
    the merge and vLLM (which adds an adapter to W as it is) all read as trained; checkpoints keep the trained form,
    which PEFT loads by redoing the init on the base."""
    import _runs
    from lora_runtime import lora_sft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.tensor([[5, 17, 42, 99, 3, 7, 8]])
    capture = _runs.Capture(probe)
    out = tmp_path / "run"
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, "max_steps": 3, "save_steps": 3,
             "init_lora_weights": init, **extra}, callbacks=[capture.callback])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["init_lora_weights"], cfg["r"]) == (True, 32)
    card = (out / "README.md").read_text()
    assert "changed the base weights" not in card  # the card gives the vLLM recipe
    assert "| LoRA r / alpha / dropout | 16 / 32 / " in card
    assert f"| LoRA init | `{init}`; saved as a plain LoRA of rank 32 on the original base |" in card

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)

    assert (capture.logits - base()(probe).logits).abs().max() > 1e-2  # it trained
    merged_dir = merge_adapter(out, tiny_llama_dir, tmp_path / "merged")
    with torch.no_grad():
        for adapter in (out, out / "checkpoints" / "checkpoint-3"):
            got = PeftModel.from_pretrained(base(), adapter).eval()(probe).logits
            torch.testing.assert_close(got, capture.logits, atol=1e-4, rtol=1e-4)
        # what vLLM computes: W + scale·B·A for every adapted module, nothing redone on the base
        plain = PeftModel.from_pretrained(base(), out).eval()
        assert all(m.get_base_layer().weight.equal(w) for m, w in zip(
            (m for m in plain.modules() if hasattr(m, "lora_A")),
            (m.weight for n, m in base().named_modules() if n.endswith(tuple(_runs.TARGETS))), strict=True))
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged_dir)(probe).logits, capture.logits,
                                   atol=1e-4, rtol=1e-4)


def test_an_adapter_of_another_model_is_one_error_naming_both(tmp_path, tiny_llama_dir, llama3_tokenizer_dir):
    """PEFT's error listed every mismatched tensor (70 lines for two layers); merge and chat print one line."""
    from lora_runtime.merge import AdapterMismatch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = build_model(tmp_path / "wider", tokenizer_dir=llama3_tokenizer_dir, hidden_size=96)
    get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterMismatch) as e:
        merge_adapter(tmp_path / "adapter", tiny_llama_dir, tmp_path / "merged")
    message = str(e.value)
    assert "\n" not in message and f"does not fit {tiny_llama_dir} (size mismatch for " in message
    assert message.endswith(f"it was trained on {other}: pass the base model it was trained on")
    assert not (tmp_path / "merged").exists()


def test_a_residual_init_on_a_tied_head_keeps_the_trained_form(tmp_path, llama3_tokenizer_dir, llama_shards, capsys):
    """With tied embeddings, PiSSA on lm_head rewrote embed_tokens too, which an adapter on lm_head cannot undo: the
    adapter is saved as trained (PEFT redoes the init on load, both weights) and the log says why."""
    import _runs
    from lora_runtime import lora_sft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = build_model(tmp_path / "base", tokenizer_dir=llama3_tokenizer_dir, tied=True)
    probe = torch.tensor([[5, 17, 42, 99, 3, 7, 8]])
    capture = _runs.Capture(probe)
    out = tmp_path / "run"
    lora_sft(str(base_dir), str(llama_shards), str(out), **{**_runs.RUN, "max_steps": 3, "save_steps": 3,
             "target_modules": ["q_proj", "lm_head"], "init_lora_weights": "pissa"}, callbacks=[capture.callback])
    assert "the adapter is saved as trained (it adapts a weight another module shares" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    assert "changed the base weights the adapter was trained on" in (out / "README.md").read_text()
    with torch.no_grad():
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()(probe).logits
    torch.testing.assert_close(got, capture.logits, atol=1e-4, rtol=1e-4)


def test_an_adapter_of_another_architecture_is_one_error_naming_both(tmp_path, tiny_llama_dir):
    """A GPT-2 base has none of a llama adapter's module names: PEFT's NoMatchingPeftModuleError was a traceback."""
    from lora_runtime.merge import AdapterMismatch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterMismatch) as e:
        merge_adapter(tmp_path / "adapter", tmp_path / "gpt2", tmp_path / "merged")
    message = str(e.value)
    assert "\n" not in message and f"does not fit {tmp_path / 'gpt2'} (Target modules" in message, message
    assert message.endswith(f"it was trained on {tiny_llama_dir}: pass the base model it was trained on")
    assert not (tmp_path / "merged").exists()


def test_an_out_that_is_a_file_or_the_current_directory_is_refused_before_anything_is_written(
        tmp_path, tiny_llama_dir, monkeypatch):
    """A file given as out_dir was set aside and deleted, and the merged model put in its place: the adapter's own
    adapter_model.safetensors among them (a path inside the adapter dir passed the adapter check). `.` failed after
    the whole merge (EBUSY renaming it aside), leaving the merged model in a staging dir that refused every retry."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    for out in (adapter / "adapter_model.safetensors", notes):
        with pytest.raises(FileExistsError, match="exists and is not a directory"):
            merge_adapter(adapter, tiny_llama_dir, out)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", here):
        with pytest.raises(FileExistsError, match="is the current directory or holds it"):
            merge_adapter(adapter, tiny_llama_dir, out)
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights and notes.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "here", "notes.txt"]
    assert list(here.iterdir()) == []


def test_a_failure_setting_the_earlier_merge_aside_leaves_it_and_no_staging_dir(tmp_path, tiny_llama_dir,
                                                                               monkeypatch):
    import errno
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    out = merge_adapter(tmp_path / "adapter", tiny_llama_dir, tmp_path / "merged")
    before = sorted(p.name for p in out.iterdir())
    rename = Path.rename

    def busy(self, target):
        if self == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", busy)
    with pytest.raises(OSError, match="busy"):
        merge_adapter(tmp_path / "adapter", tiny_llama_dir, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no .merged.tmp-*/replaced-* left
    assert sorted(p.name for p in out.iterdir()) == before
