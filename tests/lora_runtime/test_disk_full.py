"""Issue 17.4: the tokenizers library's save raises a plain Exception on a full disk ("No space left on device (os
error 28)"); it is recognised like ENOSPC: the partial checkpoint is removed and the error says which one is intact."""

from __future__ import annotations

import _runs
import pytest
from lora_runtime.api import lora_sft
from lora_runtime.errors import CheckpointError

pytestmark = pytest.mark.slow


def test_a_plain_exception_from_the_tokenizer_save_on_a_full_disk(tiny_llama_dir, llama_shards, tmp_path,
                                                                   monkeypatch):
    from transformers import PreTrainedTokenizerBase

    real = PreTrainedTokenizerBase.save_pretrained

    def save(self, save_directory, *args, **kwargs):
        if str(save_directory).endswith(".tmp-checkpoint-4"):
            raise Exception("No space left on device (os error 28)")  # what tokenizers' Rust code raises
        return real(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"disk full \(No space left on device \(os error 28\)\) while writing "
                                              r"checkpoint-4 .* the previous checkpoint .*checkpoint-2 is intact"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, "max_steps": 6, "save_steps": 2})
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-2"], names  # the partial .tmp-checkpoint-4 is gone
