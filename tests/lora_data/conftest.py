"""lora_data test helpers: loaded tokenizers (one per template) shared by the module tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizers(chatml_tokenizer_dir, llama3_tokenizer_dir, plain_tokenizer_dir):
    from transformers import AutoTokenizer

    dirs = {"chatml": chatml_tokenizer_dir, "llama3": llama3_tokenizer_dir, "plain": plain_tokenizer_dir}
    return {k: AutoTokenizer.from_pretrained(v) for k, v in dirs.items()}
