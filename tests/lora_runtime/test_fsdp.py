"""sharding="auto"|"ddp"|"fsdp" without a second process: the auto decision and its reason, the per-GPU weight
arithmetic, the refusals (each naming the way out), the peft choice under fsdp, the data position across world
sizes, and FSDP2 itself on a 1-rank gloo group (LoRA weights gathered, saved as a PEFT adapter, loaded back into
the shards). The 2-rank runs are in test_fsdp_distributed.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lora_runtime import ConfigError, LoraSftConfig, backends
from lora_runtime.backends import select_backend
from lora_runtime.backends.base import checkpoint_layers
from lora_runtime.batching import GIB, weight_bytes
from lora_runtime.sharding import decide, per_gpu_weight_bytes

LLAMA_70B = SimpleNamespace(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, vocab_size=128256,
                            num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
QWEN_1_5B = SimpleNamespace(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, vocab_size=151936,
                            num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)


def _config(**kw) -> LoraSftConfig:
    return LoraSftConfig(model_path="m", data_path="d", ckpt_output_dir="o", **kw)


# ---------------------------------------------------------------------------------------------------- auto
def test_auto_shards_a_70b_base_that_no_h200_holds_and_says_why():
    mode, why = decide(_config(max_seq_len=8192), 8, cuda=True, model_config=LLAMA_70B, free_bytes=139 * GIB)
    assert mode == "fsdp"
    assert "bf16 base 131.4 GiB" in why and "139.0 GiB free on one GPU" in why and "22.6 GiB of weights per GPU" in why


def test_auto_keeps_replicas_when_the_base_fits_with_its_activations():
    mode, why = decide(_config(max_seq_len=2048), 8, cuda=True, model_config=QWEN_1_5B, free_bytes=139 * GIB)
    assert mode == "ddp" and "a replica fits" in why


def test_auto_counts_the_activations_not_only_the_weights():
    """A 1.5B base fits a 24 GiB card; 2 rows of 64k tokens without recomputation do not."""
    small = _config(max_seq_len=65536, micro_batch_size=2, gradient_checkpointing=False)
    assert decide(small, 2, cuda=True, model_config=QWEN_1_5B, free_bytes=24 * GIB)[0] == "fsdp"
    assert decide(_config(max_seq_len=2048), 2, cuda=True, model_config=QWEN_1_5B, free_bytes=24 * GIB)[0] == "ddp"


@pytest.mark.parametrize(("kw", "world", "cuda", "says"), [
    ({}, 2, False, "no CUDA GPU"),
    ({}, 1, True, "one process"),
    ({"load_in_4bit": True}, 8, True, "bitsandbytes"),
])
def test_auto_is_ddp_where_sharding_cannot_help(kw, world, cuda, says):
    mode, why = decide(_config(**kw), world, cuda=cuda, model_config=LLAMA_70B, free_bytes=139 * GIB)
    assert mode == "ddp" and says in why


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_an_explicit_choice_is_kept(mode):
    assert decide(_config(sharding=mode), 8, cuda=True, model_config=LLAMA_70B, free_bytes=1.0) == (
        mode, f"sharding='{mode}' requested")


# ---------------------------------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("world", [1, 2, 4, 8, 64])
def test_per_gpu_weights_are_a_shard_plus_the_layers_in_flight(world):
    total = weight_bytes(LLAMA_70B, False)
    root = LLAMA_70B.vocab_size * LLAMA_70B.hidden_size * 2 * 2.0
    layer = (total - root) / LLAMA_70B.num_hidden_layers
    got = per_gpu_weight_bytes(LLAMA_70B, world, four_bit=False)
    assert got == pytest.approx(total / world + (2 * layer + root) * (1 - 1 / world))
    assert total / world <= got <= total


def test_per_gpu_weights_fall_with_more_gpus_and_4bit_is_not_sharded():
    sizes = [per_gpu_weight_bytes(LLAMA_70B, w, four_bit=False) for w in (1, 2, 4, 8)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == weight_bytes(LLAMA_70B, False)
    assert per_gpu_weight_bytes(LLAMA_70B, 8, four_bit=True) == weight_bytes(LLAMA_70B, True)


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("kw", "way_out"), [
    ({"enable_model_splitting": True}, "pick one"),
    ({"backend": "unsloth"}, "backend='peft' or 'auto', or sharding='ddp'"),
    ({"load_in_4bit": True}, "sharding='ddp' to train QLoRA replicas, or enable_model_splitting=True"),
    ({"load_in_8bit": True}, "drop load_in_4bit/load_in_8bit to shard a bf16 base"),
])
def test_fsdp_refuses_what_it_cannot_shard_naming_the_way_out(kw, way_out, monkeypatch):
    monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: True)  # these options need CUDA anyway
    with pytest.raises(ConfigError, match="sharding='fsdp'") as e:
        _config(sharding="fsdp", **kw).validate()
    assert way_out in str(e.value)
    _config(sharding="ddp", **kw).validate()  # the same settings are fine with replicas


def test_unknown_sharding_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"`sharding` must be one of \['auto', 'ddp', 'fsdp'\]"):
        _config(sharding="zero3").validate()


def test_auto_backend_on_cuda_with_fsdp_is_peft_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "unsloth_importable", lambda: (True, "unsloth imports cleanly"))
    backend, why = select_backend("auto", sharding="fsdp")
    assert backend.name == "peft" and "sharding='fsdp'" in why
    assert select_backend("auto", sharding="ddp")[0].name == "unsloth"


# ---------------------------------------------------------------------------------------------------- data position
def _rows_after(dataset, state):
    dataset.load_state_dict(state)
    dataset.set_epoch(state["epoch"])
    return [int(r["input_ids"][0]) for r in dataset]


def test_a_2_rank_data_position_resumes_on_1_rank_at_the_same_rows(toy_shards):
    """10 rows, 4 rows a step: after step 1, two ranks (micro 2) have each read 2 rows; one process (micro 2 ×
    accum 2) resumes at the same global row and reads what the two ranks would have read next."""
    from lora_runtime.dataset import PackedShardDataset

    ranks = [PackedShardDataset(toy_shards, rank=r, world_size=2, micro_batch_size=2, seed=1) for r in (0, 1)]
    state = ranks[0].state_at(1)
    assert (state["world_size"], state["offset"]) == (2, 2)
    two = [_rows_after(d, state) for d in ranks]
    one = PackedShardDataset(toy_shards, world_size=1, micro_batch_size=2, grad_accum=2, seed=1)
    got = _rows_after(one, state)
    assert len(got) == 8  # the rest of the epoch: 12 - 4 rows
    assert got == [row for pair in zip(*two, strict=True) for row in pair]  # rank 0, rank 1, rank 0, ...


def test_another_world_size_with_other_rows_per_step_is_refused(toy_shards):
    from lora_runtime.dataset import PackedShardDataset
    from lora_runtime.errors import CheckpointError

    state = PackedShardDataset(toy_shards, rank=0, world_size=2, micro_batch_size=2).state_at(1)
    with pytest.raises(CheckpointError, match="world_size: checkpoint 2 vs now 1"):
        PackedShardDataset(toy_shards, world_size=1, micro_batch_size=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------- FSDP2, 1 rank
@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    return get_peft_model(base, lora)


def test_fully_shard_on_gloo_gathers_saves_and_reloads_the_adapter(one_rank_group, tiny_llama_dir, tmp_path):
    """Per layer + root; the gathered LoRA weights are the model's; the adapter file is a plain PEFT adapter that
    `PeftModel.from_pretrained` loads to the same logits; loading it back into fresh shards restores them."""
    from lora_runtime import sharding
    from peft import PeftModel
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 123, 400, 9, 77, 301, 64]])
    model = _lora_model(tiny_llama_dir)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    logits = model(input_ids=ids).logits.detach()
    model = sharding.shard_model(model, "fp32")
    assert sharding.is_sharded(model) and model._is_accelerate_prepared
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert sum(sharding.is_sharded(m) for m in model.modules()) == 1 + len(sharding.decoder_layers(model))
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)

    got = sharding.gather_trainable(model)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    sharding.save_adapter(model, tmp_path / "a", got)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "a")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)

    fresh = sharding.shard_model(_lora_model(tiny_llama_dir), "fp32")
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    sharding.load_adapter(fresh, tmp_path / "a")
    back = sharding.gather_trainable(fresh)
    assert all(torch.equal(back[n], want[n]) for n in want)


def test_optimizer_state_round_trips_through_rank_0(one_rank_group, tiny_llama_dir, tmp_path):
    from lora_runtime import sharding

    model = sharding.shard_model(_lora_model(tiny_llama_dir), "fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(input_ids=torch.tensor([[5, 17, 123, 400]]), labels=torch.tensor([[5, 17, 123, 400]])).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)  # as the Trainer leaves it (torch initialises the new optimizer's state then)
    sharding.save_optimizer(model, opt, sched, tmp_path)
    exp_avg = {id(p): opt.state[p]["exp_avg"].full_tensor().clone() for p in params}

    opt2 = torch.optim.AdamW(params, lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    sharding.load_optimizer(model, opt2, sched2, tmp_path)
    assert all(torch.equal(opt2.state[p]["exp_avg"].full_tensor(), exp_avg[id(p)]) for p in params)
    assert sched2.state_dict()["last_epoch"] == 1 and opt2.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_ranks_other_than_0_build_the_model_on_the_meta_device(tiny_llama_dir):
    """Only rank 0 reads the weights (one copy in host memory); the others' twin has the same names and shapes."""
    from lora_runtime.backends.peft import PeftBackend
    from lora_runtime.batching import BatchPlan
    from lora_runtime.sharding import _meta_model

    config = LoraSftConfig(model_path=str(tiny_llama_dir), data_path="d", ckpt_output_dir="o", bf16=False)
    twin, _ = _meta_model(config)
    real, _ = PeftBackend().load(config, BatchPlan(micro=1, accumulation=1, world_size=1, gradient_checkpointing=False))
    assert all(p.device.type == "meta" for p in twin.parameters())
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert {k: v.dtype for k, v in twin.state_dict().items()} == {k: v.dtype for k, v in real.state_dict().items()}
    assert twin.config.use_cache is False and twin.config._attn_implementation == real.config._attn_implementation


def test_per_layer_recomputation_composes_with_the_shards(one_rank_group, tiny_llama_dir):
    """transformers' per-layer checkpointing inside FSDP2's per-layer wrap: a recomputed layer is all-gathered again
    in backward, and the LoRA gradients are those of the plain model without recomputation."""
    from lora_runtime import sharding

    ids = torch.tensor([[5, 17, 123, 400, 9, 77, 301, 64]])
    plain = _lora_model(tiny_llama_dir)
    plain(input_ids=ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    model = _lora_model(tiny_llama_dir)
    checkpoint_layers(model)  # as the peft backend: non-reentrant, the embeddings' output without a gradient
    model = sharding.shard_model(model, "fp32")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.gradient_checkpointing for layer in sharding.decoder_layers(model))
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_accumulation_passes_skip_the_reduce_scatter_until_the_last(one_rank_group, tiny_llama_dir):
    """`model.no_sync()` (what accelerate enters for every accumulation pass but the last): no sharded gradient
    yet, and the next synchronised backward yields the sum of both passes."""
    from lora_runtime import sharding

    ids = torch.tensor([[5, 17, 123, 400, 9, 77, 301, 64]])
    model = sharding.shard_model(_lora_model(tiny_llama_dir), "fp32")
    model(input_ids=ids, labels=ids).loss.backward()
    once = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with model.no_sync():
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.full_tensor(), 2 * once[n], atol=1e-6, rtol=1e-5, msg=n)
