"""CPU smoke tests of benchmarks/gpu/split.py (the model-splitting scenario): the random checkpoint it writes is what
`AutoModelForCausalLM.from_pretrained` expects, key for key, and the whole script trains a tiny llama with
`enable_model_splitting=True` (device_map="balanced" puts everything on the CPU here), saves a PEFT adapter, stops
early within its time budget and deletes the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu import split


def _checkpoint(tmp_path: Path, tok_dir: Path) -> tuple[Path, dict]:
    cfg = split.llama_config("tiny-llama", tok_dir)
    out = tmp_path / "w"
    info = split.write_checkpoint(out, cfg, tok_dir, ["cpu"], shard_bytes=100_000)
    return out, info


def test_checkpoint_loads_key_for_key(tmp_path, llama3_tokenizer_dir):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, info = _checkpoint(tmp_path, llama3_tokenizer_dir)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert info["shards"] == len(files) > 1
    assert files == sorted(p.name for p in out.glob("model-*.safetensors"))
    sizes = {}
    for f in files:
        with safe_open(out / f, "pt") as st:
            assert st.metadata() == {"format": "pt"}
            for k in st.keys():  # noqa: SIM118  (safe_open is not a mapping)
                assert index["weight_map"][k] == f, k
                t = st.get_tensor(k)
                assert t.dtype == torch.bfloat16, k
                sizes[k] = t.numel() * 2
    assert set(sizes) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(sizes.values()) == info["weights_bytes"]

    model, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in loading.items() if v} == {}
    state = model.state_dict()
    assert set(state) == set(index["weight_map"])
    assert model.config.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    assert torch.equal(state["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    q = state["model.layers.1.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    assert not torch.equal(state["model.layers.0.mlp.up_proj.weight"], state["model.layers.1.mlp.up_proj.weight"])
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(llama3_tokenizer_dir))


def test_no_room_is_a_result_with_the_numbers(tmp_path, llama3_tokenizer_dir, llama_shards, monkeypatch):
    monkeypatch.setattr(split, "HEADROOM_BYTES", 10**18)
    res = split.main([str(tmp_path / "res"), "--tok", str(llama3_tokenizer_dir), "--shards", str(llama_shards),
                      "--shape", "tiny-llama", "--cpu", "--weights-dir", str(tmp_path / "w")])
    assert res["error"].startswith("no room for")
    assert res["weights_dir"]["free_bytes"][str(tmp_path / "w")] < res["weights_dir"]["needed_bytes"]
    assert not (tmp_path / "w").exists()
    saved = json.loads((tmp_path / "res" / "split_tinyllama.json").read_text())
    assert saved["error"] == res["error"] and saved["total_s"] > 0


def _run(tmp_path, tok, shards, *extra) -> dict:
    return split.main([str(tmp_path / "res"), "--tok", str(tok), "--shards", str(shards), "--shape", "tiny-llama",
                       "--cpu", "--weights-dir", str(tmp_path / "w"), "--warmup", "1", "--min-train-s", "0", *extra])


@pytest.mark.slow
def test_trains_saves_adapter_and_deletes_weights(tmp_path, llama3_tokenizer_dir, llama_shards):
    res = _run(tmp_path, llama3_tokenizer_dir, llama_shards, "--steps", "4")
    assert res.get("error") is None, res.get("error")
    tr = res["train"]
    assert tr["steps"] == 4 and len(tr["losses"]) == 4 and tr["backend_used"] == "peft"
    assert tr["adapter_saved"] and tr["adapter_bytes"] > 0 and "adapter_config.json" in tr["adapter_files"]
    assert tr["tokens_per_s"] > 0 and tr["steady_steps"] == 2 and tr["seq_len"] == 128
    assert "stopped_by_budget_after_step" not in tr and tr["param_devices"] == ["cpu"]
    print(tr["device_map_modules"])
    assert res["fit"]["lora_params"] == 2 * 16 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 160) * 3)
    assert not (tmp_path / "w").exists() and "delete_weights_s" in res["phases"]
    saved = json.loads((tmp_path / "res" / "split_tinyllama.json").read_text())
    assert saved["train"]["losses"] == tr["losses"] and saved["total_s"] > 0


@pytest.mark.slow
def test_budget_ends_training_after_a_whole_step_and_keeps_the_adapter(tmp_path, llama3_tokenizer_dir, llama_shards):
    res = _run(tmp_path, llama3_tokenizer_dir, llama_shards, "--steps", "5", "--budget-s", "1000",
               "--reserve-s", "100000", "--keep-weights")
    tr = res["train"]
    assert tr["stopped_by_budget_after_step"] == 1 and tr["steps"] == 1 and len(tr["losses"]) == 1
    assert tr["adapter_saved"] and "only 1 steps" in tr["meter_error"]
    assert (tmp_path / "w" / "config.json").exists() and "delete_weights_s" not in res["phases"]
