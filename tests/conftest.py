"""Session-wide tiny fixtures: tokenizers trained offline and 2-layer models, built once and loaded from disk."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

# No hub is reachable where the tests run: a lookup of a name that is no local path fails at once, not after
# huggingface_hub's five retries (about 25 s each). Set before anything imports huggingface_hub, which reads it once;
# inherited by the processes tests start. Tests of the online paths mock the hub (huggingface_hub reads the variable
# once, at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _tiny
import pytest

# lora-data's tokenizer cache goes to a temporary folder, never under the user's home (set before any test imports it)
os.environ.setdefault("LORA_DATA_TOKENIZER_CACHE", tempfile.mkdtemp(prefix="lora-data-tok-cache-"))


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory) -> Path:
    return _tiny.build_tokenizer(tmp_path_factory.mktemp("tok_chatml"), template="chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    return _tiny.build_tokenizer(tmp_path_factory.mktemp("tok_llama3"), template="llama3")


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory) -> Path:
    return _tiny.build_tokenizer(tmp_path_factory.mktemp("tok_plain"), template="none")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    return _tiny.build_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", tokenizer_dir=llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, chatml_tokenizer_dir) -> Path:
    return _tiny.build_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", tokenizer_dir=chatml_tokenizer_dir)


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs("2m")` mounts a fresh tmpfs of that size, a real small filesystem to fill (root only; the test is
    skipped, saying why, where mounting is not permitted). Unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs-{len(mounted)}"
        mnt.mkdir()
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {e}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
