"""leanopt optimizers inside transformers.Trainer: built from TrainingArguments, and a
resumed run equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
import transformers

from leanopt.huggingface import create_trainer_optimizer, decay_parameter_names


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def dataset():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (24, 16), generator=g)]


def arguments(out, **kw):
    return transformers.TrainingArguments(
        str(out), max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3, learning_rate=2e-3,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, warmup_steps=1, lr_scheduler_type="cosine", report_to=[],
        use_cpu=True, seed=0, logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True, **kw,
    )


def run(out, name, resume=None, **opt_kwargs):
    model = tiny_llama()
    args = arguments(out)
    optimizer = create_trainer_optimizer(name, model, args, **opt_kwargs)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer


@pytest.mark.parametrize("name,kwargs", [("adam-mini", {}), ("sgd-sai", {"lr": 0.5}), ("adamw-pma", {"period": 4}), ("alpha-adam", {}),
                                         ("adam-mini", {"state_precision": "int8", "state_min_size": 0})])
def test_trainer_resume_equals_an_uninterrupted_run(tmp_path, name, kwargs):
    straight, _ = run(tmp_path / "a", name, **kwargs)  # also writes checkpoint-3, mid-run (and mid-period for PMA)
    resumed, opt = run(tmp_path / "b", name, resume=str(tmp_path / "a" / "checkpoint-3"), **kwargs)
    if "state_precision" in kwargs:  # the Trainer's checkpoint kept the int8 codes as they were
        assert {v.dtype for st in opt.state.values() for k, v in st.items() if k == "exp_avg"} == {torch.int8}
    moved = False
    start = tiny_llama()
    for (n, p), q, p0 in zip(straight.named_parameters(), resumed.parameters(), start.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)
        moved |= not torch.equal(p, p0)
    assert moved


def test_arguments_reach_the_optimizer(tmp_path):
    model = tiny_llama()
    args = arguments(tmp_path)
    opt = create_trainer_optimizer("alpha-adam", model, args)
    groups = {g["weight_decay"]: g for g in opt.param_groups}
    assert set(groups) == {0.1, 0.0}
    assert groups[0.1]["betas"] == (0.9, 0.95) and groups[0.1]["lr"] == 2e-3 and groups[0.1]["eps"] == args.adam_epsilon
    decayed = {id(p) for p in groups[0.1]["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in decayed) == (n in decay_parameter_names(model))
        if "norm" in n:
            assert id(p) not in decayed
    # Adam-mini reads the model: heads from the config, its own no-decay rules
    mini = create_trainer_optimizer("adam-mini", model, args)
    rows = {r.name: r for r in mini.describe_partition()}
    assert rows["model.layers.0.self_attn.k_proj.weight"].blocks == 2
    assert not rows["model.norm.weight"].weight_decay
    # optimizers without betas/eps (SGD-SaI) get only what they take
    sai = create_trainer_optimizer("sgd-sai", model, args)
    assert "betas" not in sai.param_groups[0]
