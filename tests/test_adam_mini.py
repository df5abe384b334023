"""Adam-mini: parity with the released package, the block math, and the partition of real
transformers models (built from configs; no weights, no hub)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings

import adam_mini as adam_mini_pkg
import peft
import pytest
import torch
import transformers
from torch import nn

import leanopt
from leanopt import AdamMini, PartitionWarning
from leanopt.partition import BlockLayout
from leanopt.partition.layout import block_mean_sq, expand_blocks
from helpers import max_rel_diff, tiny_model, train



def quiet(fn, *args, **kwargs):
    """Call the released adam-mini, which prints on construction and first step."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def llama(dtype=torch.float32, **overrides):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype)


def lm_train(models_and_opts, steps):
    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(7))
    for _ in range(steps):
        for model, opt in models_and_opts:
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            quiet(opt.step)


def rows_by_name(opt):
    return {r.name: r for r in opt.describe_partition()}


# --------------------------------------------------------------------------------------
# the released adam-mini 1.1.1
# --------------------------------------------------------------------------------------

KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("form", ["named", "structure"])
def test_matches_released_adam_mini_over_20_steps(form):
    # float64, so that the comparison measures the math and not how 20 steps of training
    # amplify last-bit rounding differences (in float32 those grow to ~1e-5)
    ref_model = llama(torch.float64)
    ours_model = copy.deepcopy(ref_model)
    ref = quiet(adam_mini_pkg.Adam_mini, ref_model.named_parameters(), dim=64, n_heads=8, n_kv_heads=2, **KW)
    if form == "named":
        ours = AdamMini(ours_model.named_parameters(), dim=64, n_heads=8, n_kv_heads=2, **KW)
    else:
        ours = AdamMini(ours_model.parameters(), model=ours_model, **KW)
    lm_train([(ref_model, ref), (ours_model, ours)], 20)
    assert max_rel_diff(ours_model, ref_model) <= 1e-6

    # the same partition: one second moment per block, and the same weight-decay exclusions
    ref_group = {id(g["params"][0]): g for g in ref.param_groups}
    for (name, p_ref), p_ours, row in zip(ref_model.named_parameters(), ours_model.parameters(), ours.describe_partition(), strict=True):
        v_ref = ref.state[p_ref].get("vmean", ref.state[p_ref].get("v"))
        assert ours.state[p_ours]["exp_avg_sq"].numel() == v_ref.numel() == row.blocks, name
        assert row.weight_decay == (ref_group[id(p_ref)]["weight_decay"] > 0), name


def test_matches_released_adam_mini_first_step_float32():
    ref_model = llama()
    ours_model = copy.deepcopy(ref_model)
    ref = quiet(adam_mini_pkg.Adam_mini, ref_model.named_parameters(), dim=64, n_heads=8, n_kv_heads=2, **KW)
    ours = AdamMini(ours_model.named_parameters(), dim=64, n_heads=8, n_kv_heads=2, **KW)
    lm_train([(ref_model, ref), (ours_model, ours)], 1)
    assert max_rel_diff(ours_model, ref_model) <= 1e-6


def test_state_is_m_plus_one_scalar_per_block():
    model = llama()
    opt = AdamMini(model.parameters(), model=model)
    lm_train([(model, opt)], 1)
    for p, row in zip(model.parameters(), opt.describe_partition()):
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert st["exp_avg"].shape == p.shape
        assert st["exp_avg_sq"].numel() == row.blocks
        assert row.state_elements == p.numel() + row.blocks


# --------------------------------------------------------------------------------------
# the block math, against an independent loop over blocks
# --------------------------------------------------------------------------------------


def block_slices(layout: BlockLayout):
    """Yield, for every block, an index that selects its elements from the 2-D view."""
    start = 0
    for length, per in layout.segments:
        for b in range(start, start + length, per):
            lanes = slice(b, b + per)
            yield (lanes, slice(None)) if layout.axis == 0 else (slice(None), lanes)
        start += length


LAYOUTS = [
    BlockLayout.whole(12),
    BlockLayout.element(7),
    BlockLayout((6, 5), 0, ((6, 2),)),  # heads of 2 rows
    BlockLayout((5, 12), 1, ((4, 2), (4, 2), (4, 1))),  # Conv1D c_attn: q, k heads by columns, v neurons
    BlockLayout((18, 3), 0, ((2, 2), (2, 2), (2, 1)) * 3),  # interleaved query_key_value, 3 heads
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.view}-axis{l.axis}-{len(l.segments)}seg")
def test_block_mean_sq_and_expand_match_a_loop(layout):
    g = torch.randn(layout.numel, dtype=torch.float64)
    got = block_mean_sq(g, layout, torch.float64)
    g2 = g.view(layout.view)
    expected = torch.stack([g2[idx].square().mean() for idx in block_slices(layout)])
    assert got.shape == (layout.n_blocks,)
    torch.testing.assert_close(got, expected)

    values = torch.arange(layout.n_blocks, dtype=torch.float64)
    full = torch.empty(layout.view, dtype=torch.float64)
    for b, idx in enumerate(block_slices(layout)):
        full[idx] = b
    assert torch.equal(torch.broadcast_to(expand_blocks(values, layout), layout.view), full)


def test_first_step_is_lr_g_over_block_rms():
    """At t=1 the bias-corrected update is lr·g / (sqrt(mean_B g²) + eps), per block."""
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 8, bias=True)}).double()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, eps = 0.1, 1e-8
    opt = AdamMini(model.named_parameters(), lr=lr, eps=eps, dim=8, n_heads=2)
    opt.step()
    w, g = model["q_proj"].weight, model["q_proj"].weight.grad
    for h in range(2):  # two heads of four rows each
        rows = slice(4 * h, 4 * h + 4)
        expected = start["q_proj.weight"][rows] - lr * g[rows] / (g[rows].square().mean().sqrt() + eps)
        torch.testing.assert_close(w[rows], expected)
    b, gb = model["q_proj"].bias, model["q_proj"].bias.grad  # bias: plain Adam, per element
    torch.testing.assert_close(b, start["q_proj.bias"] - lr * gb / (gb.abs() + eps))


def test_weight_decay_skips_norms_and_biases():
    model = llama()
    opt = AdamMini(model.parameters(), model=model, lr=0.1, weight_decay=0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient signal: only the decay moves parameters
    opt.step()
    for n, p in model.named_parameters():
        if "norm" in n or n.endswith("bias"):
            assert torch.equal(p, start[n]), n
        else:
            torch.testing.assert_close(p, start[n] * (1 - 0.1 * 0.5)), n


# --------------------------------------------------------------------------------------
# partitions of real models
# --------------------------------------------------------------------------------------


def on_meta(cls, **cfg):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**cfg) if not isinstance(cls, tuple) else cls[0](cls[1](**cfg))


def partition(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)  # a real transformer must need no fallback
        return rows_by_name(AdamMini(model.named_parameters(), model=model, **kwargs))


def test_partition_gpt2_conv1d_fused_qkv_tied():
    c = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    model = on_meta((transformers.GPT2LMHeadModel, transformers.GPT2Config), **c)
    rows = partition(model)
    assert rows["transformer.wte.weight"].blocks == 100  # one per token; lm_head is tied to it
    assert "lm_head.weight" not in rows
    assert rows["transformer.wpe.weight"].blocks == 32  # one per position
    # c_attn (64 x 192, Conv1D: columns are outputs): 4 q heads + 4 k heads + 64 v neurons
    assert rows["transformer.h.0.attn.c_attn.weight"].blocks == 4 + 4 + 64
    assert rows["transformer.h.0.attn.c_proj.weight"].blocks == 64
    assert rows["transformer.h.0.mlp.c_fc.weight"].blocks == 256  # columns, not the 64 rows
    assert rows["transformer.h.0.mlp.c_proj.weight"].blocks == 64
    assert rows["transformer.h.0.attn.c_attn.bias"].blocks == 192
    assert rows["transformer.h.0.ln_1.weight"].blocks == 1 and not rows["transformer.h.0.ln_1.weight"].weight_decay


def test_partition_gpt2_conv1d_blocks_are_columns():
    """A q head of c_attn is a block of head_dim *columns*: the update must use them."""
    cfg = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=10, n_positions=4)
    model = transformers.GPT2LMHeadModel(cfg).double()
    w = model.transformer.h[0].attn.c_attn.weight  # (8 in, 24 out)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    w0 = w.detach().clone()
    opt = AdamMini(model.parameters(), model=model, lr=0.1, eps=0.0)
    opt.step()
    g = w.grad
    for cols in [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)] + [slice(j, j + 1) for j in range(16, 24)]:
        expected = w0[:, cols] - 0.1 * g[:, cols] / g[:, cols].square().mean().sqrt()
        torch.testing.assert_close(w[:, cols], expected)


@pytest.mark.parametrize("head_dim", [None, 32])
def test_partition_llama_gqa(head_dim):
    c = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if head_dim:
        c["head_dim"] = head_dim
    model = on_meta((transformers.LlamaForCausalLM, transformers.LlamaConfig), **c)
    hd = head_dim or 8
    rows = partition(model)
    assert rows["model.embed_tokens.weight"].blocks == 100
    assert rows["lm_head.weight"].blocks == 100
    assert rows["model.layers.0.self_attn.q_proj.weight"].blocks == 8
    assert rows["model.layers.0.self_attn.k_proj.weight"].blocks == 2
    assert rows["model.layers.0.self_attn.v_proj.weight"].blocks == 2 * hd
    assert rows["model.layers.0.self_attn.o_proj.weight"].blocks == 64
    assert rows["model.layers.0.mlp.gate_proj.weight"].blocks == 96
    assert rows["model.layers.0.mlp.down_proj.weight"].blocks == 64
    assert rows["model.norm.weight"].blocks == 1
    whole_v = partition(model, value_blocks="whole")
    assert whole_v["model.layers.0.self_attn.v_proj.weight"].blocks == 1


def test_partition_qwen2_with_qkv_biases():
    c = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    rows = partition(on_meta((transformers.Qwen2ForCausalLM, transformers.Qwen2Config), **c))
    assert rows["model.layers.0.self_attn.q_proj.weight"].blocks == 4
    assert rows["model.layers.0.self_attn.k_proj.weight"].blocks == 2
    assert rows["model.layers.0.self_attn.v_proj.weight"].blocks == 32
    assert rows["model.layers.0.self_attn.q_proj.bias"].blocks == 64  # plain Adam
    assert rows["model.layers.0.self_attn.k_proj.bias"].blocks == 32


def test_partition_bert_encoder():
    c = dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=32, type_vocab_size=2)
    rows = partition(on_meta((transformers.BertForMaskedLM, transformers.BertConfig), **c))
    assert rows["bert.embeddings.word_embeddings.weight"].blocks == 100
    assert rows["bert.embeddings.position_embeddings.weight"].blocks == 32
    assert rows["bert.embeddings.token_type_embeddings.weight"].blocks == 2
    layer = "bert.encoder.layer.0."
    assert rows[layer + "attention.self.query.weight"].blocks == 4
    assert rows[layer + "attention.self.key.weight"].blocks == 4
    assert rows[layer + "attention.self.value.weight"].blocks == 64
    assert rows[layer + "attention.output.dense.weight"].blocks == 64
    assert rows[layer + "intermediate.dense.weight"].blocks == 128
    assert rows[layer + "output.dense.weight"].blocks == 64
    assert rows[layer + "output.LayerNorm.weight"].blocks == 1
    assert rows["cls.predictions.bias"].blocks == 100


def test_partition_gpt_neox_interleaved_query_key_value():
    c = dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    model = on_meta((transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig), **c)
    opt = AdamMini(model.named_parameters(), model=model)
    w = model.gpt_neox.layers[0].attention.query_key_value.weight  # (4 heads × [q 16 | k 16 | v 16], 64)
    layout = opt._rules[w].layout
    assert layout.n_blocks == 4 + 4 + 64
    # every q/k head block is 16 consecutive rows starting at a multiple of 48 (+16 for k)
    marker = torch.full((layout.n_blocks,), -1.0)
    lanes = torch.broadcast_to(expand_blocks(torch.arange(layout.n_blocks, dtype=torch.float32), layout), layout.view)[:, 0]
    for h in range(4):
        q, k, v = lanes[48 * h : 48 * h + 16], lanes[48 * h + 16 : 48 * h + 32], lanes[48 * h + 32 : 48 * h + 48]
        assert q.unique().numel() == 1 and k.unique().numel() == 1 and v.unique().numel() == 16
        marker[q.long()] = 1
    assert marker.eq(1).sum() == 4
    # value_blocks="whole" cannot gather the interleaved values: neurons, said once, also with given heads
    with pytest.warns(PartitionWarning, match="cannot gather values interleaved"):
        whole = AdamMini(model, value_blocks="whole", n_heads=4)
    assert whole._rules[w].layout.n_blocks == 192


def test_partition_phi3_concatenated_qkv_with_gqa():
    c = dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    rows = partition(on_meta((transformers.Phi3ForCausalLM, transformers.Phi3Config), **c))
    assert rows["model.layers.0.self_attn.qkv_proj.weight"].blocks == 8 + 2 + 2 * 8


def test_partition_torch_transformer_encoder():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    rows = partition(model)
    assert rows["layers.0.self_attn.in_proj_weight"].blocks == 4 + 4 + 32
    assert rows["layers.0.self_attn.in_proj_bias"].blocks == 96
    assert rows["layers.0.self_attn.out_proj.weight"].blocks == 32
    assert rows["layers.0.linear1.weight"].blocks == 64
    assert rows["layers.0.linear2.weight"].blocks == 32
    assert rows["layers.1.norm2.weight"].blocks == 1


def test_partition_lora_adapters():
    base = llama(num_hidden_layers=1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    rows = partition(model)
    q = "base_model.model.model.layers.0.self_attn.q_proj."
    assert rows[q + "base_layer.weight"].blocks == 8  # still one block per head
    assert rows[q + "lora_A.default.weight"].blocks == 4  # (r x in): one per output neuron
    assert rows[q + "lora_B.default.weight"].blocks == 64  # (out x r)
    assert rows[q + "lora_A.default.weight"].rule == "lora"
    # the registry optimizes only the trainable (adapter) parameters
    opt = leanopt.create_optimizer("adam-mini", model)
    assert {r.name for r in opt.describe_partition()} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_tied_embeddings_are_one_parameter_with_token_blocks():
    model = tiny_model(tie_embeddings=True)
    rows = rows_by_name(AdamMini(model.named_parameters(), model=model))
    assert rows["embed_tokens.weight"].blocks == 64 and rows["embed_tokens.weight"].rule == "token-embedding"
    assert "lm_head.weight" not in rows


def test_gpt2_small_state_is_at_most_1_01_params():
    model = on_meta((transformers.GPT2LMHeadModel, transformers.GPT2Config))
    rows = partition(model)
    n = sum(math.prod(r.shape) for r in rows.values())
    assert n == 124_439_808
    assert sum(r.state_elements for r in rows.values()) / n <= 1.01


# --------------------------------------------------------------------------------------
# the other call forms, overrides, errors
# --------------------------------------------------------------------------------------


def test_plain_params_warn_once_and_use_one_block_per_tensor():
    model = tiny_model()
    with pytest.warns(PartitionWarning) as record:
        opt = AdamMini(model.parameters())
    assert sum(issubclass(w.category, PartitionWarning) for w in record) == 1
    assert all(r.blocks == 1 for r in opt.describe_partition())


def test_no_model_warning_only_while_a_tensor_keeps_the_default_block():
    # overrides that name every tensor leave none on the fallback the warning is about
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        opt = AdamMini(model.named_parameters(), overrides={"*": "element"})
    assert all(r.rule.startswith("element (override)") for r in opt.describe_partition())
    with pytest.warns(PartitionWarning, match="no model"):
        AdamMini(model.named_parameters(), overrides={"*proj.weight": "element"})  # embeddings, norms, head: one block


def test_names_are_metadata_and_name_rules_only_when_asked_for():
    model = tiny_model()
    with pytest.warns(PartitionWarning, match="no model"):
        named = AdamMini(model.named_parameters())
    with pytest.warns(PartitionWarning, match="no model"):
        plain = AdamMini(model.parameters())
    assert [r.blocks for r in named.describe_partition()] == [r.blocks for r in plain.describe_partition()]
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    # the structure-aware partition whenever the model is known, in all three forms
    forms = [AdamMini(model), AdamMini(model.named_parameters(), model=model), AdamMini(model.parameters(), model=model)]
    assert len({tuple(r.blocks for r in o.describe_partition()) for o in forms}) == 1
    assert rows_by_name(forms[0])["layers.0.self_attn.q_proj.weight"].rule.startswith("query")
    # adam-mini 1.1.1's name rules: explicitly, or implied by dim=/n_heads= without a model
    with pytest.raises(ValueError, match="dim= and n_heads="):
        AdamMini(model.named_parameters(), partition="names")
    by_dim = rows_by_name(AdamMini(model.named_parameters(), dim=32, n_heads=4))
    by_flag = rows_by_name(AdamMini(model, partition="names", dim=32, n_heads=4))
    assert by_dim == by_flag and by_dim["lm_head.weight"].rule == "output"
    with pytest.raises(ValueError, match="needs the model"):
        AdamMini(model.parameters(), partition="model")
    with pytest.raises(ValueError, match="partition"):
        AdamMini(model, partition="rows")
    with pytest.raises(ValueError, match="another one"):
        AdamMini(model, model=tiny_model(seed=1))


def test_no_structure_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.warns(PartitionWarning, match="no embedding"):
        AdamMini(model.parameters(), model=model)


def test_missing_head_geometry_falls_back_with_warning():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 16)

    model = nn.ModuleDict({"attn": Attn(), "embed_tokens": nn.Embedding(10, 16)})
    with pytest.warns(PartitionWarning, match="head geometry"):
        opt = AdamMini(model.named_parameters(), model=model)
    assert rows_by_name(opt)["attn.q_proj.weight"].blocks == 16
    opt = AdamMini(model.named_parameters(), model=model, n_heads=4, dim=16)
    assert rows_by_name(opt)["attn.q_proj.weight"].blocks == 4


def test_overrides():
    model = tiny_model()
    opt = AdamMini(model.parameters(), model=model, overrides={"*.v_proj.weight": "whole", "lm_head.weight": "head:16", "norm.weight": "element"})
    rows = rows_by_name(opt)
    assert rows["layers.0.self_attn.v_proj.weight"].blocks == 1
    assert rows["lm_head.weight"].blocks == 4
    assert rows["norm.weight"].blocks == 32
    train(model, opt, 2)  # the overridden layouts step
    with pytest.raises(ValueError, match="matched no parameter"):
        AdamMini(model.parameters(), model=model, overrides={"nothing.*": "whole"})
    with pytest.raises(ValueError, match="unknown partition override"):
        AdamMini(model.parameters(), model=model, overrides={"norm.weight": "rows"})
    with pytest.raises(ValueError, match="not a multiple"):
        AdamMini(model.parameters(), model=model, overrides={"norm.weight": "head:5"})


def test_load_state_dict_with_other_partition_is_rejected():
    model = tiny_model()
    opt = AdamMini(model.parameters(), model=model)
    train(model, opt, 1)
    other = AdamMini(model.parameters(), model=model, value_blocks="whole")
    with pytest.raises(ValueError, match="second-moment blocks"):
        other.load_state_dict(opt.state_dict())


def test_added_param_group_is_partitioned_by_the_model():
    model = tiny_model()
    opt = AdamMini(model)
    model.classifier = nn.Linear(32, 5)  # the model grows a head after the optimizer was built
    opt.add_param_group({"params": list(model.classifier.named_parameters(prefix="classifier")), "lr": 1e-3})
    rows = rows_by_name(opt)
    assert rows["classifier.weight"].blocks == 5 and rows["classifier.weight"].rule == "neuron"
    assert rows["classifier.bias"].blocks == 5
    stray = nn.Linear(32, 3)  # not part of the model: one block per tensor, named in a warning
    with pytest.warns(PartitionWarning, match="no partition rule.*stray.weight"):
        opt.add_param_group({"params": list(stray.named_parameters(prefix="stray"))})
    assert rows_by_name(opt)["stray.weight"].blocks == 1
    with pytest.raises(ValueError, match="with/without names"):  # torch's rule: all groups named, or none
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


@pytest.mark.parametrize("new_arch,kv,expected", [(True, 2, 8 + 2 + 2 * 8), (False, 1, 8 + 1 + 8)], ids=["gqa", "multi-query"])
def test_partition_falcon_fused_query_key_value(new_arch, kv, expected):
    c = dict(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=8, new_decoder_architecture=new_arch)
    c.update(num_kv_heads=kv) if new_arch else c.update(multi_query=True)
    rows = partition(on_meta((transformers.FalconForCausalLM, transformers.FalconConfig), **c))
    assert rows["transformer.h.0.self_attention.query_key_value.weight"].blocks == expected


def test_partition_t5_head_dim_from_d_kv():
    c = dict(vocab_size=100, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=4)  # heads of 32, not 64/4
    rows = partition(on_meta((transformers.T5ForConditionalGeneration, transformers.T5Config), **c))
    assert rows["encoder.block.0.layer.0.SelfAttention.q.weight"].blocks == 4
    assert rows["encoder.block.0.layer.0.SelfAttention.v.weight"].blocks == 128
    assert rows["shared.weight"].blocks == 100


# --------------------------------------------------------------------------------------
# what people train now: mixtures of experts, vision transformers, convolutions, SSMs
# --------------------------------------------------------------------------------------

MOE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, num_experts_per_tok=2)


def test_partition_mixtral_fused_experts_and_router():
    rows = partition(on_meta((transformers.MixtralForCausalLM, transformers.MixtralConfig), **MOE, num_local_experts=4))
    experts, inter, hidden = 4, 128, 64
    # one block per output neuron of each expert: [experts, 2·inter, hidden] and [experts, hidden, inter]
    assert rows["model.layers.0.mlp.experts.gate_up_proj"].blocks == experts * 2 * inter
    assert rows["model.layers.0.mlp.experts.down_proj"].blocks == experts * hidden
    assert rows["model.layers.0.mlp.gate.weight"].blocks == experts  # the router: one per expert logit
    assert rows["model.layers.0.self_attn.q_proj.weight"].blocks == 4


def test_partition_qwen2_moe_experts_shared_expert_and_gates():
    rows = partition(on_meta((transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig), **MOE, num_experts=4,
                             moe_intermediate_size=32, shared_expert_intermediate_size=48))
    assert rows["model.layers.0.mlp.experts.gate_up_proj"].blocks == 4 * 2 * 32
    assert rows["model.layers.0.mlp.experts.down_proj"].blocks == 4 * 64
    assert rows["model.layers.0.mlp.gate.weight"].blocks == 4
    assert rows["model.layers.0.mlp.shared_expert.up_proj.weight"].blocks == 48
    assert rows["model.layers.0.mlp.shared_expert_gate.weight"].blocks == 1


def test_partition_transposed_experts_fall_back_to_one_block_per_expert_with_a_warning():
    c = dict(MOE, intermediate_size=32, num_local_experts=4, head_dim=16, layer_types=["full_attention"])
    model = on_meta((transformers.GptOssForCausalLM, transformers.GptOssConfig), **c)  # stores [experts, in, out]
    with pytest.warns(PartitionWarning, match=r"gate_up_proj: experts stored as \[experts, in, out\]"):
        rows = rows_by_name(AdamMini(model))
    assert rows["model.layers.0.mlp.experts.gate_up_proj"].blocks == 4
    assert rows["model.layers.0.self_attn.sinks"].blocks == 4  # one attention-sink logit per head


class PerExpertMoE(nn.Module):
    """Mixtral's earlier layout: a router and one ``nn.Linear`` triple per expert."""

    def __init__(self, hidden=16, inter=24, n_experts=3):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, hidden)
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(hidden, inter, bias=False), "w2": nn.Linear(inter, hidden, bias=False),
                                                    "w3": nn.Linear(hidden, inter, bias=False)}) for _ in range(n_experts))


def test_partition_per_expert_linear_experts():
    rows = partition(PerExpertMoE())
    assert rows["gate.weight"].blocks == 3
    for e in range(3):
        assert rows[f"experts.{e}.w1.weight"].blocks == 24 and rows[f"experts.{e}.w3.weight"].blocks == 24
        assert rows[f"experts.{e}.w2.weight"].blocks == 16


class TimmViT(nn.Module):
    """A timm-style ViT built from code: patch embedding (Conv2d), class and register
    tokens, a position table, fused qkv attention with num_heads/head_dim attributes."""

    class Attention(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

    def __init__(self, dim=32, heads=4, patch=4, image=16, registers=2, classes=10):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, registers, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([nn.ModuleDict({"norm1": nn.LayerNorm(dim), "attn": self.Attention(dim, heads), "norm2": nn.LayerNorm(dim),
                                                    "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))})])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)


def test_partition_timm_style_vit():
    rows = partition(TimmViT())
    assert rows["patch_embed.proj.weight"].blocks == 32  # one per output channel (32×3×4×4)
    assert rows["pos_embed"].blocks == 17  # one per position: 16 patches + the class token
    assert rows["cls_token"].blocks == 1 and rows["reg_token"].blocks == 2  # one per learned token
    assert rows["blocks.0.attn.qkv.weight"].blocks == 4 + 4 + 32  # q, k heads; v neurons
    assert rows["blocks.0.mlp.0.weight"].blocks == 128
    assert rows["head.weight"].blocks == 10


def test_partition_hf_vit_from_config():
    c = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)
    rows = partition(on_meta((transformers.ViTForImageClassification, transformers.ViTConfig), **c, num_labels=10))
    assert rows["vit.embeddings.patch_embeddings.projection.weight"].blocks == 64
    assert rows["vit.embeddings.position_embeddings"].blocks == (32 // 8) ** 2 + 1
    assert rows["vit.embeddings.cls_token"].blocks == 1
    q = next(n for n in rows if n.startswith("vit.") and n.endswith("q_proj.weight") or n.endswith("query.weight"))
    assert rows[q].blocks == 4


def test_partition_convolutions_one_block_per_output_channel():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv1d(8, 6, 3), nn.Conv3d(2, 5, 1), nn.Conv2d(8, 8, 3, groups=4))
    with pytest.warns(PartitionWarning, match="no embedding"):  # not a transformer: said once
        rows = rows_by_name(AdamMini(model))
    assert [rows[f"{i}.weight"].blocks for i in range(4)] == [8, 6, 5, 8]
    assert rows["0.bias"].blocks == 8


@pytest.mark.parametrize("version", [1, 2])
def test_partition_mamba(version):
    hidden, expand, state = 64, 2, 8
    inner = expand * hidden
    if version == 1:
        model = on_meta((transformers.MambaForCausalLM, transformers.MambaConfig), vocab_size=100, hidden_size=hidden,
                        state_size=state, num_hidden_layers=1, expand=expand, conv_kernel=4)
    else:
        model = on_meta((transformers.Mamba2ForCausalLM, transformers.Mamba2Config), vocab_size=100, hidden_size=hidden,
                        state_size=state, num_hidden_layers=1, expand=expand, conv_kernel=4, num_heads=8, head_dim=16,
                        n_groups=1)
    rows = partition(model)  # no warning: in_proj is not an attention projection
    mixer = "backbone.layers.0.mixer."
    assert rows[mixer + "in_proj.weight"].blocks == model.get_submodule(mixer + "in_proj").out_features
    assert rows[mixer + "out_proj.weight"].blocks == hidden
    conv = model.get_submodule(mixer + "conv1d")
    assert rows[mixer + "conv1d.weight"].blocks == conv.out_channels  # one per (depthwise) channel
    if version == 1:  # A_log: (inner, state), one block per channel; D: per element
        assert rows[mixer + "A_log"].blocks == inner and rows[mixer + "D"].blocks == inner
        assert rows[mixer + "x_proj.weight"].blocks == model.get_submodule(mixer + "x_proj").out_features
    else:  # per-head A_log, D and dt_bias: one block each
        assert rows[mixer + "A_log"].blocks == 8 and rows[mixer + "D"].blocks == 8 and rows[mixer + "dt_bias"].blocks == 8
    assert not rows[mixer + "A_log"].weight_decay and not rows[mixer + "D"].weight_decay  # as Mamba's reference code


def test_unrecognized_parameters_get_one_block_and_a_warning_naming_them():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(3, 4))
            self.gamma = nn.Parameter(torch.ones(4))
            self.temperature = nn.Parameter(torch.ones(()))  # a scalar: one block, no need to warn
            self.embed = nn.Embedding(5, 4)

    with pytest.warns(PartitionWarning, match=r"no partition rule for 2 parameter\(s\).*table, gamma") as record:
        rows = rows_by_name(AdamMini(Odd()))
    assert sum("no partition rule" in str(w.message) for w in record) == 1
    assert rows["table"].blocks == 1 and rows["gamma"].blocks == 1 and rows["temperature"].blocks == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        AdamMini(Odd(), overrides={"table": "neuron", "gamma": "element"})


def test_given_head_geometry_that_does_not_fit_raises():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(10, 10)

    model = nn.ModuleDict({"attn": Attn(), "embed_tokens": nn.Embedding(10, 10)})
    with pytest.raises(ValueError, match=r"does not fit attn.q_proj.weight.*heads=3"):
        AdamMini(model, n_heads=3)


LAYOUTS_OF_SHARDS = [
    ((12, 10), BlockLayout.per_lane((12, 10))),  # a row per block (output neurons)
    ((12, 10), BlockLayout.per_lane((12, 10), axis=1)),  # a column per block (transposed weights)
    ((12, 10), BlockLayout((3, 40), 0, ((3, 1),))),  # adam-mini's heads: 4 rows each, cut by any row split
    ((12, 10), BlockLayout.lanes_of((12, 10), 0, ((8, 4), (4, 2)))),  # q heads of 4 rows, then kv heads of 2
    ((12, 10), BlockLayout.whole(120)),
    ((12,), BlockLayout.element(12)),  # a bias
    ((3, 4, 5), BlockLayout((12, 5), 0, ((12, 1),))),  # experts' neurons
    ((3, 4, 5), BlockLayout((3, 20), 0, ((3, 1),))),  # one block per expert
]


@pytest.mark.parametrize("shape,layout", LAYOUTS_OF_SHARDS, ids=lambda x: str(x))
def test_block_sums_and_scaling_of_any_part_of_a_tensor(shape, layout):
    """A shard holding any set of indices per dimension (uneven rows, TP columns, strided
    rows) gives its share of every block's sum of g², and scales its own elements by their
    blocks' values: checked against the whole tensor with the other elements zeroed."""
    from leanopt._distributed import Piece
    from leanopt.partition.layout import BlockView, block_lane_sq, block_sums

    gen = torch.Generator().manual_seed(len(shape) * 7 + layout.n_blocks)
    for trial in range(6):
        index = tuple(None if trial % 3 == 0 and d == len(shape) - 1 else
                      torch.randperm(n, generator=gen)[: max(1, n // 2 + trial % 2)].sort().values for d, n in enumerate(shape))
        if trial == 5:
            index = (torch.tensor([], dtype=torch.long),) + index[1:]  # an empty shard
        full = torch.randn(shape, dtype=torch.float64, generator=gen)
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[torch.meshgrid(*[torch.arange(n) if i is None else i for n, i in zip(shape, index)], indexing="ij")] = True
        part = full[torch.meshgrid(*[torch.arange(n) if i is None else i for n, i in zip(shape, index)], indexing="ij")]
        view = BlockView(layout, Piece(shape, index, ()))
        expected = block_sums(block_lane_sq((full * mask).reshape(layout.view), layout.axis, torch.float64), layout)
        torch.testing.assert_close(view.sq_sums(part.contiguous(), torch.float64), expected, rtol=1e-12, atol=0)
        values = torch.rand(layout.n_blocks, dtype=torch.float64, generator=gen) + 0.5
        whole = BlockView(layout).scaled(full, values)
        torch.testing.assert_close(view.scaled(part.contiguous(), values), whole[mask].view(part.shape))
        p = part.clone().contiguous()
        view.sub_scaled_(p, part.contiguous(), values)
        torch.testing.assert_close(p, part - whole[mask].view(part.shape))


@pytest.mark.parametrize("shape,layout", [c for c in LAYOUTS_OF_SHARDS if c[1].axis == 0], ids=lambda x: str(x))
def test_a_shard_steps_the_blocks_it_holds_whole_in_one_pass(shape, layout):
    """The C step of shards runs its one-pass kernel on the rows of the blocks a rank holds
    whole and the two-pass path on the rest: the runs must cover every local row once, in
    order, hold exactly the lanes of their blocks, and take every block that FSDP2's row
    split leaves whole (equal blocks only; a split along the columns leaves none whole)."""
    from leanopt._distributed import Piece
    from leanopt.partition.layout import BlockView, lane_to_block

    lane_block = lane_to_block(layout, torch.device("cpu"), torch.float64)[0]
    k = layout.uniform
    n = shape[0]
    for lo, hi in [(0, n), (0, n // 2 + 1), (n // 2 + 1, n), (1, 2), (2, 2), (2, n - 1)]:
        rows = torch.arange(lo, hi)
        for cols in (None, torch.arange(1, shape[-1])):  # every column, or a TP-like column split
            index = (rows, *([None] * (len(shape) - 1)))
            if cols is not None:
                if len(shape) == 1:
                    continue
                index = (*index[:-1], cols)
            view = BlockView(layout, Piece(shape, index, ()))
            whole, other = view.row_runs()
            spans = sorted([(r0, r1) for r0, r1, _, _ in whole] + other)
            assert [a for a, _ in spans] == [0, *[b for _, b in spans[:-1]]][:len(spans)]
            assert (spans[-1][1] if spans else 0) == view.local_view[0]
            lanes = view.lane_ids
            held = set()
            for r0, r1, b0, b1 in whole:
                assert k is not None and lanes[r0:r1].tolist() == list(range(b0 * k, b1 * k))
                held |= set(range(b0, b1))
            local = set(lanes.tolist())
            expect = set() if cols is not None or k is None or view.local_view[1] != layout.view[1] else {
                b for b in range(layout.n_blocks) if set((lane_block == b).nonzero().flatten().tolist()) <= local}
            assert held == expect, (lo, hi, whole, other)
