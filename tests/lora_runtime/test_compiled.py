"""The compiled path's parts that a CPU can check: the packed-batch hook and the attention function registered with
transformers (the flash kernel replaced by per-sample SDPA, the GPU test covers the kernel itself), and when
backend="auto" takes the path (the memory budget rule)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from lora_runtime import LoraSftConfig, attention, chunked_loss, compiled
from lora_runtime.backends.base import flatten_hook
from lora_runtime.collate import collate_packed
from lora_runtime.config import RECOMPUTE_LEVELS

LR = 1e-3  # test_the_compiled_path_trains_like_the_plain_one's SGD step (its gaussian LoRA B overshoots at 1e-2)


def _per_sample_sdpa(q, k, v, cu, max_len, scale):
    """The reference for aten's flash varlen kernel: causal attention within each [cu[i], cu[i+1]) span."""
    assert max_len >= int((cu[1:] - cu[:-1]).max())
    rep = q.shape[1] // k.shape[1]
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0), is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out)


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for lens in ([11, 17, 9], [20, 28]):  # a pad tail in the first row, none in the second
        ids = np.concatenate([rng.integers(10, 900, n) for n in lens])
        rows.append({"input_ids": np.pad(ids, (0, 48 - len(ids)), constant_values=7),
                     "loss_mask": np.pad(np.ones(len(ids), np.uint8), (0, 48 - len(ids))), "seq_lens": np.array(lens)})
    batch = collate_packed(rows)
    batch.pop("num_tokens")
    return batch


def _loss_and_grads(model_dir, attn: str, hook) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.register_forward_pre_hook(hook, with_kwargs=True)
    loss = model(**_rows()).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("model_fixture", ["tiny_qwen2_dir", "tiny_llama_dir"])
def test_packed_varlen_attention_equals_block_diagonal_sdpa(request, monkeypatch, model_fixture):
    """Flattened rows + cu_seq_lens through the registered attention give the loss and gradients of transformers'
    own block-diagonal masks over the rows: the boundaries reach every layer, pad tails included."""
    model_dir = request.getfixturevalue(model_fixture)
    monkeypatch.setattr(attention, "_FLASH", type("Reference", (), {"apply": staticmethod(_per_sample_sdpa)}))
    want = _loss_and_grads(model_dir, "sdpa", flatten_hook(keep_seq_lengths=False, flatten=False))
    got = _loss_and_grads(model_dir, attention.register(), flatten_hook(keep_seq_lengths=False, boundaries=True))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_the_hook_bounds_the_longest_sample_by_the_row_and_refuses_a_mask():
    kwargs = flatten_hook(keep_seq_lengths=False, boundaries=True)(None, (), _rows())[1]
    assert kwargs["input_ids"].shape == (1, 96) and "packed_seq_lengths" not in kwargs
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 11, 28, 37, 48, 68, 96] and kwargs["max_length_q"] == 48
    with pytest.raises(ValueError, match="no attention mask"):
        flatten_hook(keep_seq_lengths=False, boundaries=True)(None, (), {**_rows(), "attention_mask": torch.ones(2, 48)})


def test_under_cuda_graphs_the_hook_pads_the_boundaries_to_a_fixed_count():
    """A pass of two rows with few samples gets 2 × GRAPH_SAMPLES_PER_ROW boundaries (one graph replays them all);
    a pass with more samples pads to the next power of two."""
    hook = functools.partial(flatten_hook(keep_seq_lengths=False, boundaries=True, graphs=True), torch.nn.Module())
    cu = hook((), _rows())[1]["cu_seq_lens_q"].tolist()
    assert len(cu) == 2 * compiled.GRAPH_SAMPLES_PER_ROW + 1
    assert cu[:7] == [0, 11, 28, 37, 48, 68, 96] and set(cu[7:]) == {96}
    ones = {"input_ids": np.arange(150), "loss_mask": np.ones(150, np.uint8), "seq_lens": np.ones(150, np.int64)}
    many = collate_packed([ones, ones])  # 300 samples of one token
    many.pop("num_tokens")
    cu = hook((), many)[1]["cu_seq_lens_q"].tolist()
    assert len(cu) == 512 + 1 and cu[:3] == [0, 1, 2] and set(cu[300:]) == {300}
    run = torch.nn.Module()
    run.graph_segments = 40  # the most a pass of the run holds: every pass gets that shape from the first
    cu = flatten_hook(keep_seq_lengths=False, boundaries=True, graphs=True)(run, (), _rows())[1]["cu_seq_lens_q"]
    assert len(cu) == 64 + 1 and cu[:7].tolist() == [0, 11, 28, 37, 48, 68, 96]


def test_the_most_segments_a_pass_can_hold_bounds_every_pass(tmp_path):
    """The densest rows' samples and padding tails: what the collator's `packed_seq_lengths` can reach, and does."""
    from lora_data import Manifest, ShardWriter
    from lora_runtime.dataset import PackedShardDataset
    from torch.utils.data import DataLoader

    writer = ShardWriter(tmp_path, seq_len=8, pad_id=0)
    for lens in ([3, 1], [8], [2, 2, 2], [1, 1, 1, 1, 1]):  # 2 samples + tail, 1, 3 + tail, 5 + tail
        writer.add_row(np.arange(1, sum(lens) + 1), np.ones(sum(lens), np.uint8), seq_lens=lens)
    Manifest(seq_len=8, pad_id=0, shards=[s.to_dict() for s in writer.close()]).save(tmp_path)
    data = PackedShardDataset(tmp_path, shuffle=False)
    assert data.reader.samples_per_row().tolist() == [2, 1, 3, 5]
    # a full row is counted with a tail too: a bound (the densest rows are rarely full)
    assert data.most_segments(2) == 6 + 4 and data.most_segments(1) == 6 and data.most_segments(4) == 3 + 2 + 4 + 6
    rows = [data.reader[i]._asdict() for i in (2, 3)]
    densest = collate_packed([{"input_ids": r["input_ids"], "loss_mask": r["loss_mask"], "seq_lens": r["seq_lens"]}
                              for r in rows])
    assert len(densest["packed_seq_lengths"]) == data.most_segments(2)
    # fewer rows than a pass: the dataset serves some twice in it (more than 15, each row once), the bound too
    nine = PackedShardDataset(tmp_path, shuffle=False, micro_batch_size=9)
    (pass_of_nine,) = DataLoader(nine, batch_size=9, collate_fn=collate_packed)
    assert 15 < len(pass_of_nine["packed_seq_lengths"]) <= nine.most_segments(9) == 2 * (5 + 3 + 2 + 1) + 5 + 9


def test_before_a_replay_every_trainable_parameter_has_a_gradient_buffer_of_its_own():
    """Under CUDA graphs autograd must accumulate into `.grad` buffers outside the graphs' pool: made once, zeroed
    where the trainer set `.grad` to None, left alone within a gradient accumulation; none in evaluation."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    compiled.before_replay(model)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 3 and all(g is not None and not g.any() for g in grads) and model[0].weight.grad is None
    model(torch.ones(2, 3)).sum().backward()
    compiled.before_replay(model)  # the next pass of an accumulation: the sums stay
    assert [p.grad for p in model.parameters() if p.requires_grad] == grads and model[1].bias.grad.item() == 2.0
    model.zero_grad(set_to_none=True)
    compiled.before_replay(model)  # after the optimizer step: the same buffers, zeroed
    again = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(a is b for a, b in zip(again, grads, strict=True)) and not any(g.any() for g in again)
    model.zero_grad(set_to_none=True)
    model.eval()
    compiled.before_replay(model)
    assert all(p.grad is None for p in model.parameters())
    compiled.release(model)  # after training: the buffers go
    assert "_lora_grad_buffers" not in model.__dict__


def test_cuda_graphs_follow_the_plan_and_refuse_what_they_cannot_replay(tmp_path, monkeypatch):
    from lora_runtime.batching import BatchPlan
    from lora_runtime.config import ConfigError
    from lora_runtime.distributed import DistEnv
    from lora_runtime.preflight import machine_issues

    model = _qwen15b_shaped(tmp_path)
    plain = BatchPlan(micro=2, accumulation=1, world_size=1, gradient_checkpointing=False)
    some = BatchPlan(micro=8, accumulation=1, world_size=1, gradient_checkpointing=True, recomputed_layers=5)
    offloading = BatchPlan(micro=8, accumulation=1, world_size=1, gradient_checkpointing=False, offloaded_layers=3)
    auto, asked = LoraSftConfig(model, "d", "o"), LoraSftConfig(model, "d", "o", cuda_graphs=True)
    # auto: on for a small pass (the host sets its pace) with nothing a graph cannot replay, else off, never raising
    assert compiled.graphs(auto, plain) == (True, "auto: a pass of 4,096 tokens, host-bound without them")
    large = BatchPlan(micro=8, accumulation=1, world_size=1, gradient_checkpointing=False)
    assert compiled.graphs(auto, large) == (
        False, "CUDA graphs off (auto: a pass of 16,384 tokens keeps the GPU busy (auto replays passes of up to 8,192))")
    four = BatchPlan(micro=4, accumulation=1, world_size=1, gradient_checkpointing=False)
    assert compiled.graphs(auto, four, 1_543_714_304) == (True, "auto: a pass of 8,192 tokens, host-bound without them")
    assert compiled.graphs(auto, offloading)[1].startswith("CUDA graphs off (auto: the plan offloads 3 layer(s); a pass")
    # the base model's size: 8,192 tokens of the measured 1.5B replay, 4,096 of an 8B keep the GPU busy; 2,048 of 3B
    # replay
    assert compiled.graphs(auto, plain, 1_543_714_304)[0] is True
    assert compiled.graphs(auto, plain, 8_030_261_248) == (False, "CUDA graphs off (auto: a pass of 4,096 tokens "
                                                          "through 8.0B parameters keeps the GPU busy (auto replays up "
                                                          "to 8,192 tokens' worth of 1.6B))")
    one = BatchPlan(micro=1, accumulation=1, world_size=1, gradient_checkpointing=False)
    assert compiled.graphs(auto, one, 3_085_938_688)[0] is True
    assert compiled.graphs(asked, plain, 8_030_261_248) == (True, "cuda_graphs=True")  # asked: the size is the user's
    for other, words in (({"lora_dropout": 0.05}, "lora_dropout=0.05"), ({"eval_split_ratio": 0.1}, "evaluation"),
                         ({"eval_data_path": "eval.jsonl"}, "evaluation")):
        assert compiled.graphs(LoraSftConfig(model, "d", "o", **other), plain) == (
            False, f"CUDA graphs off (auto: {words})")
    for level in ("pointwise", "most"):  # recomputed inside a layer's compiled backward: replayed where asked for
        # one backend a setting: Dynamo never serves layers compiled with graphs to a run without, nor the reverse
        assert compiled.recompute_backend(level, True) is not compiled.recompute_backend(level, False)
        assert compiled.recompute_backend(level, True) is compiled.recompute_backend(level, True)
        assert compiled.graphs(LoraSftConfig(model, "d", "o", selective_recompute=level), plain) == (
            False, f"CUDA graphs off (auto: selective_recompute={level!r}, measured slower with them)")
        assert compiled.graphs(LoraSftConfig(model, "d", "o", selective_recompute=level, cuda_graphs=True),
                               plain) == (True, "cuda_graphs=True")
    assert compiled.graphs(asked, plain) == (True, "cuda_graphs=True")
    with pytest.raises(RuntimeError, match="cuda_graphs=True cannot run: the plan offloads 3 layer"):
        compiled.graphs(asked, offloading)
    assert compiled.graphs(LoraSftConfig(model, "d", "o", cuda_graphs=False), plain)[0] is False
    with pytest.raises(RuntimeError, match="cuda_graphs=True cannot run: the plan recomputes 5 layer"):
        compiled.graphs(LoraSftConfig(model, "d", "o", cuda_graphs=True), some)
    monkeypatch.setattr("lora_runtime.distributed.dist_env", lambda: DistEnv(rank=0, local_rank=0, world_size=2))
    assert compiled.graphs(auto, plain) == (
        False, "CUDA graphs off (auto: several processes (DDP's gradient buckets are not replayed))")
    with pytest.raises(RuntimeError, match="cuda_graphs=True cannot run: several processes"):
        compiled.graphs(LoraSftConfig(model, "d", "o", cuda_graphs=True), plain)
    for other, words in (({"activation_offload": True}, "activation_offload=True"),
                         ({"gradient_checkpointing": True}, "gradient_checkpointing=True"),
                         ({}, "gradient_checkpointing='auto' \\(pass False"),
                         ({"nproc_per_node": 2}, "2 processes"),
                         ({"kernels": "liger"}, "kernels='liger'"),
                         ({"backend": "unsloth"}, "backend='unsloth'")):
        with pytest.raises(ConfigError, match=f"cuda_graphs=True cannot run with {words}"):
            LoraSftConfig(model, "d", "o", cuda_graphs=True, **other).validate()
    assert compiled.asked_for(LoraSftConfig(model, "d", "o", cuda_graphs=True)) == "cuda_graphs=True"
    monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: False)
    issues = machine_issues(LoraSftConfig(model, "d", "o", cuda_graphs=True))
    assert any(i.startswith("`cuda_graphs`=True needs CUDA (CUDA graphs of the compiled decoder layers)")
               for i in issues)


@pytest.fixture
def a_gpu_with(monkeypatch):
    """Pretend to be a bf16 CUDA GPU with flash attention and `gib` of free memory."""
    from lora_runtime import batching

    def set_free(gib: float) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(attention, "available", lambda: (True, ""))
        monkeypatch.setattr(batching, "memory_budget", lambda config, lowered=True: (gib * batching.GIB, "free"))

    return set_free


def _qwen15b_shaped(tmp_path) -> str:
    """A config.json of the Qwen2.5-1.5B shape (no weights: the rule reads the config only)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}))
    return str(tmp_path)


def test_auto_takes_the_compiled_path_where_a_large_pass_fits_without_recomputation(tmp_path, a_gpu_with):
    model = _qwen15b_shaped(tmp_path)
    a_gpu_with(139)
    ok, why = compiled.prefers(LoraSftConfig(model, "d", "o"))
    assert ok and "8,192 tokens a pass without checkpointing need 22.3 GiB of 139.0" in why
    assert compiled.prefers(LoraSftConfig(model, "d", "o", micro_batch_size=2))[0]
    a_gpu_with(16)  # 4 rows of 2048 need 22.3 GiB: Unsloth, recomputing, is the faster there without the levers
    ok, why = compiled.prefers(LoraSftConfig(model, "d", "o", selective_recompute="off"))
    assert not ok and "need 22.3 GiB of 16.0" in why
    assert compiled.prefers(LoraSftConfig(model, "d", "o", micro_batch_size=2))[0]  # 13.6 GiB fits
    assert compiled.prefers(LoraSftConfig(model, "d", "o", kernels="compile"))[0]  # asked for: any budget
    # effective_batch_size=2 allows no pass larger than micro_batch_size=2's: the same path, no lever
    for given in ({"micro_batch_size": 2}, {"effective_batch_size": 2}):
        chosen, levers = compiled.choose_levers(LoraSftConfig(model, "d", "o", **given))
        assert (chosen.selective_recompute, chosen.activation_offload, levers) == ("off", False, ""), given
        ok, why = compiled.prefers(LoraSftConfig(model, "d", "o", selective_recompute="off", **given))
        assert ok and "4,096 tokens a pass without checkpointing need 13.6 GiB of 16.0" in why, given


def test_auto_levers_take_the_compiled_path_where_only_they_make_a_large_pass_fit(tmp_path, a_gpu_with):
    """selective_recompute/activation_offload="auto": off where the compiled path fits as it is (139, 24 GiB) or
    where nothing fits (5 GiB); pointwise alone where it makes 8,192 tokens fit; pointwise and offload where only
    both do (16 GiB: the combination measured 1.41x the Unsloth loop there on an H100); "most" where pointwise with a few
    offloaded layers does not (10 and 7 GiB), with offload for the plan to weigh (a larger pass with layers
    offloaded against a smaller one without); never offload alone. Offload asked for: pointwise with every layer
    offloaded, last, where "most" holds too much (5.9 GiB)."""
    from lora_runtime.batching import GIB, compiled_footprint

    model = _qwen15b_shaped(tmp_path)
    shape = compiled.read_model_config(LoraSftConfig(model, "d", "o"))
    plain, pointwise = (compiled_footprint(shape, level=p).need(8192, 0) / GIB for p in ("off", "pointwise"))
    for gib, want in ((139, ("off", False)), (24, ("off", False)), ((plain + pointwise) / 2, ("pointwise", False)),
                      (16, ("pointwise", True)), (10, ("most", True)), (7, ("most", True)), (5, ("off", False))):
        a_gpu_with(gib)
        chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o"))
        assert (chosen.selective_recompute, chosen.activation_offload) == want, gib
        assert bool(why) == (want[0] != "off") and compiled.prefers(LoraSftConfig(model, "d", "o"))[0] == (
            gib != 5), gib
    a_gpu_with(16)
    ok, why = compiled.prefers(LoraSftConfig(model, "d", "o"))
    assert ok and why.startswith("compiled peft path with selective_recompute='pointwise' (auto) and "
                                 "activation_offload=True (auto): 8,192 tokens a pass without checkpointing "
                                 "(pointwise work recomputed, 6 layers offloaded) need ")
    # asked for one of them: the other follows; pointwise with offload asked for, at any budget
    chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o", selective_recompute="pointwise"))
    assert chosen.activation_offload is True and "activation_offload=True (auto)" in why
    a_gpu_with(139)
    chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o", activation_offload=True))
    assert chosen.selective_recompute == "pointwise" and why.endswith("(pointwise work recomputed, 6 layers "
                                                                      "offloaded) need 15.0 GiB of 139.0 (free)")
    a_gpu_with(7)  # offload asked for: "most" where pointwise with a few offloaded layers does not fit
    chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o", activation_offload=True))
    assert chosen.selective_recompute == "most" and why.endswith("(all but attention recomputed, every layer "
                                                                 "offloaded) need 5.9 GiB of 7.0 (free)")
    chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o", activation_offload=False))
    assert (chosen.selective_recompute, chosen.activation_offload, why) == ("off", False, "")
    a_gpu_with(5.9)  # offload asked for where "most" holds too much at its backward: pointwise, every layer offloaded
    chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o", activation_offload=True))
    assert chosen.selective_recompute == "pointwise" and why.endswith("(pointwise work recomputed, every layer "
                                                                      "offloaded) need 5.8 GiB of 5.9 (free)")
    chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o"))  # not asked for: never that slow rung
    assert (chosen.selective_recompute, chosen.activation_offload, why) == ("off", False, "")
    # "most" asked for: offload comes with it for the plan to weigh, also where the pass fits without (the log gives
    # that pass's arithmetic); refused, never
    weighed = ("compiled peft path with selective_recompute='most' and activation_offload=True (auto: the plan weighs "
               "how many layers, none included): 8,192 tokens a pass without checkpointing (all but attention "
               "recomputed")
    for gib, words in ((139, ") need 7.9 GiB of 139.0 (free)"), (10, ") need 7.9 GiB of 10.0 (free)"),
                       (7, ", every layer offloaded) need 5.9 GiB of 7.0 (free)")):
        a_gpu_with(gib)
        chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o", selective_recompute="most"))
        assert (chosen.selective_recompute, chosen.activation_offload) == ("most", True), gib
        assert why == weighed + words, gib
        chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o", selective_recompute="most",
                                                           activation_offload=False))
        assert (chosen.selective_recompute, chosen.activation_offload, why) == ("most", False, ""), gib
    a_gpu_with(16)
    for other in ({"lora_dropout": 0.05}, {"backend": "peft"}, {"gradient_checkpointing": True},
                  {"cuda_graphs": True}, {"kernels": "liger"}, {"selective_recompute": "off"}, {"use_dora": True}):
        chosen, why = compiled.choose_levers(LoraSftConfig(model, "d", "o", **other))
        assert chosen.activation_offload is False and chosen.selective_recompute in ("off",) and not why, other


def test_auto_levers_are_off_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    chosen, why = compiled.choose_levers(LoraSftConfig(_qwen15b_shaped(tmp_path), "d", "o", max_memory_gib=16))
    assert (chosen.selective_recompute, chosen.activation_offload, why) == ("off", False, "")


def _footprints(tmp_path, a_gpu_with, gib: float, *variants: dict):
    """The Qwen2.5-1.5B shape's config dir and its footprints on the compiled path (kernels="compile" plus each
    variant's options) with `gib` GiB free."""
    from lora_runtime.backends.peft import PeftBackend, _model_config

    model = _qwen15b_shaped(tmp_path)
    a_gpu_with(gib)
    _model_config.cache_clear()
    model_config = _model_config(model, False)
    return model, [PeftBackend().footprint(model_config, LoraSftConfig(model, "d", "o", kernels="compile", **v))
                   for v in variants]


def test_pointwise_recompute_keeps_less_a_layer_and_asks_for_the_compiled_path(tmp_path, a_gpu_with):
    """selective_recompute="pointwise": a layer keeps SwiGLU's product and the two RMSNorm outputs no longer (2 ×
    (8960 + 2 × 1536) bytes a token for this shape), costs an estimated 3% more GPU time a token, and a pass of
    8,192 tokens that needs 22.3 GiB without it needs 16.7 GiB with it. It is the compiled path's own: backend
    auto takes that path for it whatever the budget (and with gradient_checkpointing=True)."""
    from lora_runtime.batching import GIB

    model, (keep, lean) = _footprints(tmp_path, a_gpu_with, 20, {}, {"selective_recompute": "pointwise"})
    assert keep.per_token_layer - lean.per_token_layer == 2 * (8960 + 2 * 1536)
    assert lean.step_cost(8192, 0) > keep.step_cost(8192, 0)
    assert round(lean.need(8192, 0) / GIB, 1) == 16.7
    assert not compiled.prefers(LoraSftConfig(model, "d", "o", selective_recompute="off"))[0]


def test_most_recompute_keeps_a_layers_input_and_attention_output(tmp_path, a_gpu_with):
    """selective_recompute="most": a layer keeps 3 hidden states a token (6 × 1536 bytes: its input, attention's
    output, the folded gate/up's input), its backward holds 1.86 layers' activations while it recomputes, a pass of
    8,192 tokens needs 7.9 GiB (5.9 with every layer's few tensors offloaded), and checkpointing on top adds no
    working set (the checkpointed forward keeps what it keeps anyway), only saves the attention output: never more
    memory than without."""
    from lora_runtime.batching import GIB

    _, (keep, most) = _footprints(tmp_path, a_gpu_with, 20, {}, {"selective_recompute": "most"})
    assert most.per_token_layer == 6 * 1536 and most.per_token_base == pytest.approx(1.86 * keep.per_token_layer)
    assert most.step_cost(8192, 0) > keep.step_cost(8192, 0)
    assert (round(most.need(8192, 0) / GIB, 1), round(most.need(8192, 0, 28) / GIB, 1)) == (7.9, 5.9)
    assert all(most.peak(8192, k) <= most.peak(8192, 0) for k in (1, 14, 28))


def test_the_plan_checkpoints_most_layers_only_where_nothing_fits_without(tmp_path, a_gpu_with):
    """Under "most" checkpointing a layer saves only its attention output for a whole forward more: a gain within
    the cost model's error, so the plan takes it only where no pass fits without (rows of 4096 under 9.5 GiB: 2
    rows, not 3 with one layer checkpointed; one row of 16,384 under 9.3 GiB needs 11.2 without: 19 layers
    checkpointed)."""
    import dataclasses

    from lora_runtime.batching import GIB, plan_batch

    _, (most,) = _footprints(tmp_path, a_gpu_with, 20, {"selective_recompute": "most"})

    def plan(fp, seq_len: int, gib: float) -> tuple[int, int]:
        c = plan_batch(fp, seq_len=seq_len, budget=gib * GIB, micro="auto", gc="auto", quota=None,
                       rows_per_rank=10**4)
        return c.micro, c.recomputed

    assert most.checkpoint_last and plan(most, 4096, 9.5) == (2, 0)
    assert plan(dataclasses.replace(most, checkpoint_last=False), 4096, 9.5) == (3, 1)  # what it would pick
    assert plan(most, 16384, 9.3) == (1, 19)


@pytest.mark.parametrize("level", RECOMPUTE_LEVELS)
def test_a_recompute_level_asks_for_the_compiled_path(tmp_path, a_gpu_with, level):
    """A selective_recompute level is the compiled path's own: backend auto takes that path for it whatever the
    budget (and with gradient_checkpointing=True); "most" brings offload for the plan to weigh, and says so."""
    model = _qwen15b_shaped(tmp_path)
    a_gpu_with(20)
    for options in ({}, {"gradient_checkpointing": True}):
        ok, why = compiled.prefers(LoraSftConfig(model, "d", "o", selective_recompute=level, **options))
        if level == "most" and not options:  # offload comes with it for the plan to weigh
            assert ok and why.startswith("compiled peft path with selective_recompute='most' and "
                                         "activation_offload=True (auto: the plan weighs how many layers"), why
        else:
            assert ok and why == f"selective_recompute={level!r} runs on the compiled peft path", (options, why)


@pytest.mark.parametrize("level", RECOMPUTE_LEVELS)
def test_a_recompute_level_is_refused_off_the_compiled_path(tmp_path, a_gpu_with, level):
    from lora_runtime.config import ConfigError

    model = _qwen15b_shaped(tmp_path)
    a_gpu_with(139)
    for other in ({"kernels": "liger"}, {"kernels": "none"}, {"backend": "unsloth"}):
        with pytest.raises(ConfigError, match=f"selective_recompute={level!r} applies to the compiled path"):
            LoraSftConfig(model, "d", "o", selective_recompute=level, **other).validate()
    with pytest.raises(ConfigError, match="`selective_recompute` must be one of"):
        LoraSftConfig(model, "d", "o", selective_recompute="everything").validate()
    with pytest.raises(ConfigError, match="would draw a new dropout mask in backward"):
        LoraSftConfig(model, "d", "o", selective_recompute=level, lora_dropout=0.05).validate()
    # its recomputation is part of a layer's compiled backward: CUDA graphs replay it
    LoraSftConfig(model, "d", "o", selective_recompute=level, cuda_graphs=True, gradient_checkpointing=False).validate()
    from lora_runtime.preflight import machine_issues

    assert not machine_issues(LoraSftConfig(model, "d", "o", selective_recompute=level))
    issues = machine_issues(LoraSftConfig(model, "d", "o", selective_recompute=level, use_dora=True))
    assert issues == [f"`selective_recompute`={level!r} cannot run here: DoRA is not compiled here (pass "
                      "selective_recompute='off')"]


@pytest.mark.parametrize("level", RECOMPUTE_LEVELS)
def test_a_recompute_level_needs_cuda(tmp_path, monkeypatch, level):
    from lora_runtime.preflight import machine_issues

    monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: False)
    issues = machine_issues(LoraSftConfig(_qwen15b_shaped(tmp_path), "d", "o", selective_recompute=level))
    assert any(f"`selective_recompute`={level!r} needs CUDA" in i for i in issues)


@pytest.mark.parametrize("option, words", [
    ({"gradient_checkpointing": True}, "Unsloth recomputes layers faster"),
    ({"load_in_4bit": True}, "bitsandbytes-quantized"),
    ({"use_dora": True}, "DoRA"),
    ({"target_modules": ("q_proj", "lm_head")}, "adapter on lm_head"),  # transformers' loss: full logits
    ({"flash_attention": False}, "flash_attention=False"),
    ({"trust_remote_code": True}, "remote modeling code"),
    ({"kernels": "liger"}, ""),
    ({"backend": "unsloth"}, ""),
])
def test_auto_leaves_the_compiled_path_where_it_was_not_measured(tmp_path, a_gpu_with, option, words):
    a_gpu_with(139)
    ok, why = compiled.prefers(LoraSftConfig(_qwen15b_shaped(tmp_path), "d", "o", **option))
    assert not ok and words in why


def test_auto_leaves_the_compiled_path_for_model_types_it_was_not_measured_on(tmp_path, a_gpu_with):
    model = _qwen15b_shaped(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"qwen2"', '"gemma2"')
    (tmp_path / "config.json").write_text(text)
    a_gpu_with(139)
    ok, why = compiled.prefers(LoraSftConfig(model, "d", "o"))
    assert not ok and "model type 'gemma2'" in why


def test_the_decision_reaches_the_backend_and_keeps_unsloth_unimported(tmp_path, a_gpu_with, monkeypatch):
    """backend="auto" with the compiled path preferred: the peft backend, with the reason in the log, and no
    `import unsloth` (its patches would change transformers for the whole process)."""
    import sys

    from lora_runtime import backends

    a_gpu_with(139)
    config = LoraSftConfig(_qwen15b_shaped(tmp_path), "d", "o")
    fast = compiled.prefers(config)
    backend, why = backends.select_backend("auto", compiled=fast)
    assert backend.name == "peft" and why.startswith("auto: compiled peft path")
    imported = []
    monkeypatch.setattr("lora_runtime.backends.unsloth.import_unsloth", lambda *a: imported.append(a))
    monkeypatch.setattr(backends, "unsloth_importable", lambda: (True, "unsloth imports cleanly"))
    for name in ("transformers", "peft", "trl"):  # as if nothing had imported them yet
        monkeypatch.delitem(sys.modules, name, raising=False)
    backends.import_unsloth_first(config)
    assert imported == []
    backends.import_unsloth_first(LoraSftConfig(config.model_path, "d", "o", gradient_checkpointing=True))
    assert len(imported) == 1  # the control: where Unsloth will run, it is imported first


def test_a_sliding_window_shorter_than_the_rows_keeps_the_model_off_the_compiled_path(tmp_path, a_gpu_with):
    import json

    model = _qwen15b_shaped(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "mistral", "sliding_window": 4096}))
    a_gpu_with(139)
    ok, why = compiled.prefers(LoraSftConfig(model, "d", "o", max_seq_len=8192))
    assert not ok and "sliding window of 4096 tokens, shorter than max_seq_len=8192" in why
    assert compiled.prefers(LoraSftConfig(model, "d", "o", max_seq_len=4096))[0]
    (tmp_path / "config.json").write_text(json.dumps({**raw, "sliding_window": 4096, "use_sliding_window": False}))
    assert compiled.prefers(LoraSftConfig(model, "d", "o", max_seq_len=8192))[0]  # Qwen2's window switched off
    (tmp_path / "config.json").write_text(json.dumps({**raw, "sliding_window": 4096}))
    assert compiled.prefers(LoraSftConfig(model, "d", "o", max_seq_len=8192))[0]  # ...and off by default


@pytest.mark.parametrize("fields", [{"model_type": "mistral"}, {"model_type": "mistral", "sliding_window": 4096},
                                    {"sliding_window": 4096}, {"sliding_window": 4096, "use_sliding_window": True},
                                    {"model_type": "llama"}])
def test_the_window_read_from_config_json_is_the_one_transformers_loads(tmp_path, fields):
    """The decision reads config.json raw (before transformers may be imported), the backend through AutoConfig,
    which fills in its class defaults: both must see the same window."""
    import json

    from transformers import AutoConfig

    _qwen15b_shaped(tmp_path)
    raw = {**json.loads((tmp_path / "config.json").read_text()), **fields}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = LoraSftConfig(str(tmp_path), "d", "o")
    assert compiled.sliding_window(compiled.read_model_config(config)) == compiled.sliding_window(
        AutoConfig.from_pretrained(tmp_path))


def test_without_the_chunked_loss_the_plan_counts_the_full_logits(tmp_path, a_gpu_with):
    """kernels="compile" with an adapter on lm_head runs transformers' loss: the memory plan must count its logits."""
    _, (chunked, full) = _footprints(tmp_path, a_gpu_with, 139, {}, {"target_modules": ("q_proj", "lm_head")})
    assert chunked.per_token_base == 0 and chunked.extra > 0
    assert full.per_token_base == 12 * 151936 and full.extra == 0


def test_kernels_compile_that_cannot_run_is_refused_before_any_data_work(tmp_path, a_gpu_with):
    from lora_runtime.preflight import machine_issues

    a_gpu_with(139)
    issues = machine_issues(LoraSftConfig(_qwen15b_shaped(tmp_path), "d", "o", kernels="compile", use_dora=True))
    assert any("`kernels`='compile' cannot run here: DoRA is not compiled here" in i for i in issues)
    assert not any("kernels" in i for i in machine_issues(LoraSftConfig(str(tmp_path), "d", "o", kernels="compile")))


@pytest.mark.parametrize("recompute", [False, True, "pointwise", "most"])
def test_the_compiled_path_trains_like_the_plain_one(tiny_qwen2_dir, monkeypatch, capsys, recompute):
    """The whole compiled path through the peft backend on a CPU, fp32: load (registered attention, chunked loss),
    add_lora (boundaries hook, LoRA B folded into gate and up, A into down, k and v without a level, layers
    compiled, with and without recomputation), a pass, a step of SGD, a second pass (the compiled layers read the
    updated weights) and an evaluation give the plain path's losses and LoRA gradients (those of the second pass
    within the rounding one step apart leaves). Dynamo traces every layer (aot_eager: no code generation, so it
    stays fast); the flash kernel is the per-sample SDPA reference. "pointwise": no layer checkpointed, each layer's
    pointwise work recomputed by the partitioner (aot_eager partitions as Inductor does), which must keep at least
    `pointwise_bytes_per_token` a token and layer less (fp32 here: twice that) for the same numbers. "most": all but
    attention recomputed, the layers keeping less again: under 60% of what they keep without it (the reference
    attention's own tensors stay)."""
    import torch._functorch.config
    from lora_runtime.backends.peft import PeftBackend
    from lora_runtime.batching import fixed_plan, pointwise_bytes_per_token
    from transformers import AutoConfig

    monkeypatch.setattr(attention, "_FLASH", type("Reference", (), {"apply": staticmethod(_per_sample_sdpa)}))
    monkeypatch.setattr(compiled, "INNER_COMPILER", "aot_eager")
    compiled_with = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compiled_with(self, backend=kw.get("backend", "aot_eager")))

    level = recompute if isinstance(recompute, str) else "off"

    def step(kernels: str, fast: bool, selective: str = "off", checkpointing: bool = recompute is True):
        monkeypatch.setattr(PeftBackend, "compiled", staticmethod(lambda config: fast))
        cuda = selective != "off" or (fast and not checkpointing)  # selective_recompute and cuda_graphs ask for CUDA,
        monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: cuda)
        monkeypatch.setattr(attention, "available", lambda: (cuda, "no CUDA"))  # flash attention and bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)
        config = LoraSftConfig(str(tiny_qwen2_dir), "d", "o", backend="peft", kernels=kernels, lora_r=4,
                               init_lora_weights="gaussian", gradient_checkpointing=checkpointing, seed=1,
                               selective_recompute=selective,
                               cuda_graphs=fast and recompute is False and not checkpointing)
        plan = fixed_plan(config, 1, micro=2)
        backend = PeftBackend()
        model, _ = backend.load(config, plan)
        model = backend.add_lora(model, config, plan)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
        model.train()
        batch = _rows()
        batch["labels"][:, :16] = chunked_loss.IGNORE_INDEX  # a prompt in each row
        assert chunked_loss.counts_targets(model) == fast
        if fast:  # the targets counted as the trainer counts them: only the rows with a target make logits
            batch[chunked_loss.TARGETS_KWARG] = chunked_loss.target_count(batch["labels"])
            assert 0 < batch[chunked_loss.TARGETS_KWARG] <= chunked_loss.PICK_SHARE * batch["labels"].numel()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = model(**batch).loss
        saved_bytes.append(sum(saved))
        loss.backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = {n: p.grad.clone() for n, p in trainable.items()}
        with torch.no_grad():  # a step of SGD, then the next pass: the compiled layers must read the new weights
            for p in trainable.values():
                p -= LR * p.grad
        model.zero_grad()
        again = model(**batch).loss
        again.backward()
        grads.update({f"{n} (second pass)": p.grad.clone() for n, p in trainable.items()})
        model.eval()
        with torch.no_grad():
            evaluated = model(**batch, **({"skip_logits": True} if fast else {})).loss
        return torch.stack([loss.detach(), again.detach()]), grads, evaluated

    from torch._dynamo.utils import counters

    saved_bytes: list[int] = []
    want_loss, want_grads, want_eval = step("none", fast=False)
    assert want_loss[0] - want_loss[1] > 1e-3, want_loss  # far beyond the tolerance: stale weights would show
    torch._dynamo.reset()
    if level != "off":  # one process: without it, with it, without it (no layer compiled for the other setting may
        step("auto", fast=True)  # be served, and none of it may stay set)
    counters.clear()
    loss, grads, evaluated = step("auto", fast=True, selective=level)  # "compile" is refused
    traced = counters["stats"]["unique_graphs"]  # without CUDA
    log = capsys.readouterr().out
    assert "chunked loss" in log and "2 decoder layers compiled" in log and traced >= 2  # training and evaluation
    assert "LoRA B folded into the GEMM of 4 widening projections" in log  # gate and up (intermediate = 2 × hidden)
    # down (and k, v where they narrow as much) without a level; a level's partitioner would keep their input
    compiling = [line for line in log.splitlines() if "decoder layers compiled" in line][-1]
    assert ("LoRA A into the GEMM of" in compiling) == (level == "off"), compiling
    # no layer recomputed: CUDA graphs asked for, the boundaries padded with empty samples (the same numbers)
    assert ("each replaying CUDA graphs" in log) == (recompute is False)
    if level != "off":
        step("auto", fast=True)
        assert f"{compiled.LEVEL_WORDS[level]} in their backward" in log
        shape = AutoConfig.from_pretrained(tiny_qwen2_dir)
        tokens, layers = _rows()["input_ids"].numel(), shape.num_hidden_layers
        off, lean, off_again = saved_bytes[1:]
        step("auto", fast=True, checkpointing=True)  # each layer's input kept by the checkpoint, out of sight
        outside = saved_bytes[-1]  # what no layer keeps (embeddings, final norm, loss)
        less = 2 * pointwise_bytes_per_token(shape) * tokens * layers
        assert off - lean >= less and off_again == off, (saved_bytes, less)
        if level == "most":  # SDPA's math kernel (the reference here) keeps its own tensors, not recomputed
            assert lean - outside <= 0.6 * (off - outside), saved_bytes
        assert torch._functorch.config.activation_memory_budget == 1.0
    torch._dynamo.reset()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(evaluated, want_eval, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    # the two paths round differently (folded weights, per-sample attention): their LoRA gradients agree within 1e-3
    # of each tensor's largest on the CPUs tried (up to 2e-4 apart on an AMD EPYC, where a bound of 1e-4 failed); a
    # gradient of A 1% off fails it, and stale weights move those after the step by over a quarter of it
    for name, g in grads.items():
        want = want_grads[name]
        torch.testing.assert_close(g, want, rtol=0.0, atol=1e-3 * want.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_grouped_query_flop_counts_where_torch_asserts_equal_heads(monkeypatch):
    """torch 2.11's attention flop formulas assert as many key/value heads as query heads, and the partitioner's
    memory budget counts flops with them: patched, they count a grouped-query call as its broadcast equivalent."""
    from torch.utils import flop_counter

    def equal_heads_only(formula):
        def counted(*shapes):
            q, k, v = shapes[-3:]
            assert q[1] == k[1] == v[1], "query/key/value shapes are incompatible"
            return formula(*shapes)
        return counted

    forward, backward = flop_counter.sdpa_flop_count, flop_counter.sdpa_backward_flop_count
    monkeypatch.setattr(flop_counter, "sdpa_flop_count", equal_heads_only(forward))
    monkeypatch.setattr(flop_counter, "sdpa_backward_flop_count", equal_heads_only(backward))
    q, kv = (1, 4, 16, 8), (1, 2, 16, 8)
    with pytest.raises(AssertionError):
        flop_counter.sdpa_flop_count(q, kv, kv)
    compiled.grouped_query_flop_counts()
    assert flop_counter.sdpa_flop_count(q, kv, kv) == forward(q, q, q)
    assert flop_counter.sdpa_backward_flop_count(q, q, kv, kv) == backward(q, q, q, q)
    compiled.grouped_query_flop_counts()  # patched once: a second call changes nothing
    assert flop_counter.sdpa_flop_count(q, kv, kv) == forward(q, q, q)


def test_activation_offload_sizes_the_plan_by_the_measured_link(tmp_path, a_gpu_with, monkeypatch, capsys):
    """activation_offload: the footprint takes the link's measured bandwidth and the host memory it may use, the
    compiled path is taken where a pass of 8,192 tokens fits with every layer offloaded (not without), backend auto
    goes to peft for it, and the plan's offloaded layers reach the BatchPlan and the log."""
    from lora_runtime import backends, offload
    from lora_runtime.backends.peft import PeftBackend
    from lora_runtime.batching import GIB, resolve

    monkeypatch.setattr(offload, "host_link_bandwidth", lambda device_index=0: 50e9)
    monkeypatch.setattr(offload, "host_memory_budget", lambda local_processes=1: 64 * GIB)
    model, (plain, offloading) = _footprints(tmp_path, a_gpu_with, 16, {}, {"activation_offload": True})
    assert (plain.offload_bandwidth, offloading.offload_bandwidth, offloading.host_budget) == (0.0, 50e9, 64 * GIB)
    assert offloading.gpu_tokens_per_s > 0
    assert not compiled.prefers(LoraSftConfig(model, "d", "o", selective_recompute="off"))[0]
    config = LoraSftConfig(model, "d", "o", activation_offload=True, selective_recompute="pointwise")
    fast = compiled.prefers(config)
    assert fast[0] and "selective_recompute='pointwise' runs on the compiled peft path" in fast[1]
    fast = compiled.prefers(LoraSftConfig(model, "d", "o", activation_offload=True, selective_recompute="off"))
    assert fast[0] and "(every layer offloaded)" in fast[1]
    backend, why = backends.select_backend("auto", compiled=fast, offload=True)
    assert backend.name == "peft" and why.startswith("auto: compiled peft path")
    backend, why = backends.select_backend("auto", offload=True)  # not on the compiled path: still peft
    assert backend.name == "peft" and "activation_offload=True runs on transformers+PEFT" in why
    assert PeftBackend().checkpointing_by_memory(LoraSftConfig(model, "d", "o", kernels="none", activation_offload=True))
    assert not PeftBackend().checkpointing_by_memory(LoraSftConfig(model, "d", "o", kernels="none"))
    out = resolve(config, PeftBackend(), rows=900)
    assert out.offloaded_layers > 0 and out.to_dict()["offloaded_layers"] == out.offloaded_layers
    assert f"activation offload → {out.offloaded_layers} of 28 layers" in capsys.readouterr().out
    # explicit micro batch and checkpointing: the plan still decides the offload (nothing else would)
    out = resolve(LoraSftConfig(model, "d", "o", activation_offload=True, selective_recompute="pointwise",
                                micro_batch_size=4, gradient_checkpointing=False), PeftBackend(), rows=900)
    assert (out.micro, out.gradient_checkpointing) == (4, False) and out.offloaded_layers > 0


def test_activation_offload_is_refused_where_it_cannot_apply(tmp_path, monkeypatch):
    from lora_runtime.config import ConfigError
    from lora_runtime.preflight import machine_issues

    model = _qwen15b_shaped(tmp_path)
    for other, words in (({"backend": "unsloth"}, "offloads its own checkpointed layers"),
                         ({"sharding": "fsdp"}, "sharded and split models"),
                         ({"enable_model_splitting": True}, "sharded and split models"),
                         ({"gradient_checkpointing": True}, "leaving nothing to offload")):
        with pytest.raises(ConfigError, match=words):
            LoraSftConfig(model, "d", "o", activation_offload=True, **other).validate()
    monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: False)
    issues = machine_issues(LoraSftConfig(model, "d", "o", activation_offload=True))
    assert any(i.startswith("`activation_offload`=True needs CUDA (a copy stream to pinned host memory)")
               for i in issues)
