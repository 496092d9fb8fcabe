"""select_backend: auto → unsloth only with CUDA and a clean `import unsloth`; the choice carries its reason; picking a
backend never imports unsloth in this process (it patches transformers/TRL)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from lora_runtime import backends
from lora_runtime.backends import select_backend
from lora_runtime.backends.base import Backend


def test_auto_on_cpu_is_peft_with_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend, why = select_backend("auto")
    assert backend.name == "peft" and isinstance(backend, Backend) and "no CUDA" in why


def test_auto_with_cuda_but_broken_unsloth_is_peft(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "unsloth_importable", lambda: (False, "`import unsloth` failed: ImportError: x"))
    backend, why = select_backend("auto")
    assert backend.name == "peft" and "import unsloth` failed" in why


def test_auto_with_cuda_and_unsloth_picks_unsloth_without_importing_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "unsloth_importable", lambda: (True, "unsloth imports cleanly"))
    backend, why = select_backend("auto")
    assert backend.name == "unsloth" and isinstance(backend, Backend) and "CUDA available" in why
    assert "unsloth" not in sys.modules


def test_unsloth_requested_on_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="use backend='peft'"):
        select_backend("unsloth")


@pytest.mark.parametrize("embeddings", [["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens"]])
def test_a_lora_on_lm_head_or_the_embeddings_is_peft_never_unsloth(monkeypatch, embeddings):
    """Unsloth moves lm_head and embed_tokens from target_modules to modules_to_save: it would train those whole
    matrices (lm_head alone is 233M parameters of Qwen2.5-1.5B), not the LoRA asked for."""
    from lora_runtime.kernels import embedding_targets

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "unsloth_importable", lambda: (True, "unsloth imports cleanly"))
    assert embedding_targets(["q_proj", *embeddings]) == embeddings
    assert embedding_targets("all-linear") == [] and embedding_targets(r".*(q_proj|lm_head)") == ["lm_head"]
    backend, why = select_backend("auto", embeddings=embeddings)
    assert backend.name == "peft" and f"a LoRA on {' and '.join(embeddings)} runs on transformers+PEFT" in why
    from lora_runtime import ConfigError, LoraSftConfig

    with pytest.raises(ConfigError, match=rf"backend='unsloth' trains {' and '.join(embeddings)} as whole matrices"):
        LoraSftConfig("m", "d", "o", backend="unsloth", target_modules=["q_proj", *embeddings]).validate()
    LoraSftConfig("m", "d", "o", backend="unsloth", target_modules=["q_proj"]).validate()


def test_a_lora_on_lm_head_is_refused_where_unsloth_patched_this_process(monkeypatch, tiny_llama_dir, llama_shards,
                                                                         tmp_path):
    """Unsloth's patched models compute the loss from lm_head's base weight: in a process where it was imported (an
    earlier run on the unsloth backend), the peft backend's LoRA on lm_head got no gradient and never trained."""
    import types

    from lora_runtime import ConfigError
    from lora_runtime.api import lora_sft

    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
    with pytest.raises(ConfigError, match="puts a LoRA on lm_head, but Unsloth is imported in this process"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "o"), backend="peft", max_steps=1,
                 target_modules=["q_proj", "lm_head"])


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="auto, unsloth, peft"):
        select_backend("deepspeed")


def test_unsloth_probe_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backends, "importlib_util_find_spec", lambda name: None)
    backends.unsloth_importable.cache_clear()
    try:
        ok, detail = backends.unsloth_importable()
    finally:
        backends.unsloth_importable.cache_clear()
    assert not ok and "lora-runtime[gpu]" in detail


def test_auto_with_model_splitting_is_peft(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "unsloth_importable", lambda: (True, "unsloth imports cleanly"))
    backend, why = select_backend("auto", splitting=True)
    assert backend.name == "peft" and "enable_model_splitting" in why


def test_auto_under_torchrun_still_picks_unsloth(monkeypatch):
    # PackedTrainer.get_batch_samples moves batches to the GPU before unsloth_zoo counts them over NCCL
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "unsloth_importable", lambda: (True, "unsloth imports cleanly"))
    assert select_backend("auto")[0].name == "unsloth"


@pytest.mark.parametrize(("env", "visible"), [({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5"}, "5"),
                                               ({"LOCAL_RANK": "3"}, "3")])
def test_the_unsloth_probe_sees_only_this_ranks_gpu(monkeypatch, env, visible):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert backends._probe_env()["CUDA_VISIBLE_DEVICES"] == visible


def test_the_unsloth_probe_runs_once_per_environment(monkeypatch, tmp_path):
    """The child `import unsloth` (15-40 s) is cached by interpreter and package versions, not repeated per run."""
    import subprocess

    calls = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(backends, "importlib_util_find_spec", lambda name: object())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(backends, "_probe_key", lambda: "python torch==2 unsloth==1")
    try:
        for _ in range(3):
            backends.unsloth_importable.cache_clear()
            ok, detail = backends.unsloth_importable()
            assert ok and detail.startswith("unsloth imports cleanly")
        assert len(calls) == 1 and "same versions" in detail
        monkeypatch.setattr(backends, "_probe_key", lambda: "python torch==2 unsloth==2")  # an upgrade probes again
        backends.unsloth_importable.cache_clear()
        backends.unsloth_importable()
        assert len(calls) == 2 and len(json.loads(backends.probe_cache_path().read_text())) == 2
    finally:
        backends.unsloth_importable.cache_clear()


def test_unsloth_is_not_imported_first_where_the_run_may_not_use_it(monkeypatch):
    """import_unsloth_first never patches a process that may train with peft (and on a CPU never tries)."""
    import sys

    from lora_runtime import LoraSftConfig

    monkeypatch.setattr(backends, "unsloth_importable", lambda: pytest.fail("must not probe"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for kw in ({"backend": "peft"}, {"enable_model_splitting": True}, {"sharding": "fsdp"}):
        backends.import_unsloth_first(LoraSftConfig("m", "d", "o", **kw))
    monkeypatch.setenv("WORLD_SIZE", "2")  # sharding="auto" under torchrun is decided later, from the model's size
    backends.import_unsloth_first(LoraSftConfig("m", "d", "o"))
    assert "unsloth" not in sys.modules


def _fake_unsloth(tmp_path, monkeypatch, name: str) -> list:
    """A module that records UNSLOTH_ALLOW_CPU as it is imported (the real Unsloth reads it at import)."""
    import sys

    seen: list = []
    (tmp_path / f"{name}.py").write_text("import os, builtins\nbuiltins._seen.append(os.environ.get('UNSLOTH_ALLOW_CPU'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("builtins._seen", seen, raising=False)
    monkeypatch.delitem(sys.modules, name, raising=False)
    return seen


@pytest.mark.parametrize("case, expected", [("cuda", "1"), ("cpu", None), ("asked", None), ("rocm", None)])
def test_unsloth_is_imported_without_its_trl_rewrite_on_cuda_only(tmp_path, monkeypatch, case, expected):
    """Unsloth's rewrite of TRL's trainers (12 s of start-up; this runtime uses transformers' Trainer) is skipped
    through UNSLOTH_ALLOW_CPU=1 for the import only, on CUDA hosts; not on ROCm, not on CPUs, not when asked for."""
    import os

    import torch
    from lora_runtime.backends.unsloth import TRL_PATCHES_ENV, import_unsloth

    name = f"fake_unsloth_{case}"
    seen = _fake_unsloth(tmp_path, monkeypatch, name)
    monkeypatch.delenv("UNSLOTH_ALLOW_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: case != "cpu")
    monkeypatch.setattr(torch.version, "hip", "6.2" if case == "rocm" else None)
    if case == "asked":
        monkeypatch.setenv(TRL_PATCHES_ENV, "1")
    import_unsloth(name)
    import_unsloth(name)  # imported once
    assert seen == [expected] and "UNSLOTH_ALLOW_CPU" not in os.environ


def test_the_probe_cache_key_names_the_probe_and_the_variables_it_depends_on(monkeypatch):
    """A changed probe command, or LORA_SFT_UNSLOTH_TRL_PATCHES / UNSLOTH_ALLOW_CPU, must probe again."""
    monkeypatch.delenv("LORA_SFT_UNSLOTH_TRL_PATCHES", raising=False)
    key = backends._probe_key()
    assert backends.PROBE in key
    monkeypatch.setenv("LORA_SFT_UNSLOTH_TRL_PATCHES", "1")
    assert backends._probe_key() != key
