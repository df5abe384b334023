"""The registry and the ``leanopt`` command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import leanopt
from leanopt.cli import main
from helpers import tiny_model


def test_names_are_lowercase_with_hyphens_and_include_the_baselines():
    names = leanopt.list_optimizers()
    assert {"adam-mini", "sgd-sai", "adamw", "sgd", "adafactor"} <= set(names)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in names)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        leanopt.create_optimizer("adam-maxi", tiny_model())
    for name in leanopt.list_optimizers():
        assert name in str(err.value)


def test_baselines_choose_their_implementation_explicitly():
    model = tiny_model()
    adamw = leanopt.create_optimizer("adamw", model)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["fused"] is True
    sgd = leanopt.create_optimizer("sgd", model)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["foreach"] is True
    # kwargs override the registry's choice
    assert leanopt.create_optimizer("adamw", model, fused=False, foreach=True).param_groups[0]["foreach"] is True


def test_model_gives_adam_mini_its_structure_and_params_do_not():
    model = tiny_model()
    rows = {r.name: r for r in leanopt.create_optimizer("adam-mini", model).describe_partition()}
    assert rows["layers.0.self_attn.q_proj.weight"].blocks == 4
    with pytest.warns(leanopt.PartitionWarning):
        plain = leanopt.create_optimizer("adam-mini", model.parameters())
    assert all(r.blocks == 1 for r in plain.describe_partition())


def test_model_given_twice_is_taken_once_and_another_model_is_refused():
    model = tiny_model()
    twice = leanopt.create_optimizer("adam-mini", model, model=model)  # the model= of AdamMini's own signature
    assert [r.blocks for r in twice.describe_partition()] == [r.blocks for r in leanopt.create_optimizer("adam-mini", model).describe_partition()]
    for other in (tiny_model(), None):
        with pytest.raises(ValueError, match=r"model=\w+ is not the module given as model_or_params"):
            leanopt.create_optimizer("adam-mini", model, model=other)


def test_frozen_parameters_are_left_out():
    model = tiny_model()
    model.embed_tokens.weight.requires_grad_(False)
    for name in leanopt.list_optimizers():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = leanopt.create_optimizer(name, model)
        params = [p for g in opt.param_groups for p in g["params"]]
        assert all(p is not model.embed_tokens.weight for p in params), name
        assert len(params) == sum(1 for p in model.parameters() if p.requires_grad)


def test_cli_list_measures_state_per_parameter(capsys):
    assert main(["list", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    ratios = dict(re.findall(r"^([a-z-]+)\s+([0-9.]+)x", out, re.M))
    assert set(ratios) == set(leanopt.list_optimizers())
    assert float(ratios["adamw"]) == 2.0
    assert 1.0 <= float(ratios["sgd-sai"]) < 1.01  # m plus two scalars per tensor
    assert 1.0 < float(ratios["adam-mini"]) < 1.1  # the tiny model has relatively many blocks


def test_cli_list_precisions_measures_every_precision_on_gpt2_small(capsys, monkeypatch):
    from leanopt import cli
    # three of the optimizers (every one costs a second); "adamw" has compact state through
    # leanopt.AdamW, torch's SGD none: the CLI itself leaves it out
    monkeypatch.setattr(cli, "list_optimizers", lambda: ["adamw", "sgd", "adam-mini", "alpha-adam"])
    cli._list_precisions()
    out = capsys.readouterr().out
    rows = {m.group(1): [float(x) for x in m.group(2).split()]
            for m in re.finditer(r"^([a-z-]+)\s+([0-9. ]+)$", out, re.M)}
    assert set(rows) == {"adamw", "adam-mini", "alpha-adam"}
    assert rows["adamw"][:3] == pytest.approx([8.0, 4.0, 2.0 + 8 / 256], abs=0.02)  # fp32 AdamW keeps 8 bytes
    param, bf16, int8, int4 = rows["adam-mini"]
    assert 4.0 < param < 4.05 and bf16 == pytest.approx(param / 2, abs=0.01)
    assert int8 <= 1.05 and int4 <= 0.55  # the smallest state of any adaptive optimizer
    assert rows["alpha-adam"][3] == pytest.approx(rows["alpha-adam"][2] - 0.5, abs=0.01)  # int4 m, int8 v


def test_cli_partition_demo(capsys):
    assert main(["partition", "--demo"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"layers\.0\.self_attn\.q_proj\.weight\s+128x128\s+query \(4 heads\)\s+4\s+16388", out)
    n = leanopt.models.build_model("demo").num_parameters()
    assert re.search(rf"parameters:\s+{n:,} elements", out)
    ratio = float(re.search(r"Adam-mini state \(m \+ v\):\s+[0-9,]+ elements = ([0-9.]+) x params", out).group(1))
    assert 1.0 < ratio <= 1.01


def test_cli_partition_hf_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    transformers.GPT2Config().to_json_file(path)
    assert main(["partition", "--hf-config", str(tmp_path), "--summary"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"parameters:\s+124,439,808 elements", out)
    assert "= 1.0018 x params" in out
    assert "qkv" in out and "q_proj" not in out  # --summary: no per-parameter rows


@pytest.mark.parametrize(
    "content,message",
    [(None, "not found"), ("{not json", "not valid JSON"), (json.dumps({"n_embd": 3}), "model_type")],
)
def test_cli_partition_bad_config(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    assert main(["partition", "--hf-config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "leanopt", "--help"], capture_output=True, text=True, check=True).stdout
    assert "partition" in out and "list" in out
