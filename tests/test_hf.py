"""Hugging Face interoperability against transformers itself (no network): `tierzero ckpt export`
folders load into LlamaForCausalLM / MixtralForCausalLM / Glm4MoeForCausalLM with no missing or
unexpected keys and the same logits as tierzero's forward; checkpoint.init_from reads bf16
sharded save_pretrained folders exactly; model.from_hf builds the published shape.

The checkpoints are made in-process: a tiny model built by recipes/model.py, three AdamW steps
on random tokens (so routing is not uniform), written through CheckpointStore with the resolved
config in its training state, as a run writes it. Seconds in all."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the reference loader: pip install 'tierzero[test]'")

from tierzero.checkpoint.export import (InitFromError, load_into, read_safetensors, read_weights,  # noqa: E402
                                        to_bfloat16, write_safetensors)
from tierzero.checkpoint.store import CheckpointStore, Slice  # noqa: E402
from tierzero.launcher.cli import main  # noqa: E402
from tierzero.launcher.config import ConfigError, load_config, to_yaml  # noqa: E402
from tierzero.parallel.moe import moe_layers  # noqa: E402
from tierzero.recipes.model import build_model, loss_fn  # noqa: E402

VOCAB, SEQ = 128, 16
TINY = ["model.d_model=32", "model.n_heads=2", f"data.seq_len={SEQ}", f"data.vocab_size={VOCAB}", "launcher.nproc=1"]
MOE = ["moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=32"]
VARIANTS = {
    "dense": [],
    "mixtral": MOE,
    "glm4_moe": [*MOE, "moe.gate=sigmoid", "moe.shared_experts=1", "moe.bias_update_rate=0.001"],
    "unnormalised": [*MOE, "moe.norm_topk_prob=false"],
}


def _config(overrides):
    return load_config(["dense_tiny_cpu"], [*TINY, *overrides])


def _model_of(cfg):
    return build_model(cfg.model, cfg.data.vocab_size, cfg.data.seq_len, cfg.moe if cfg.moe.num_experts else None)


def _trained_checkpoint(root: Path, overrides):
    """(model, step folder) of a tiny model after three AdamW steps, saved as a run saves it."""
    cfg = _config(overrides)
    model = _model_of(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
        loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if cfg.moe.bias_update_rate:  # a bias that moved, as the aux-loss-free balancing leaves it
        for layer in moe_layers(model):
            layer.expert_bias.copy_(torch.randn(layer.expert_bias.shape, generator=g) * 0.05)
    store = CheckpointStore(str(root))
    kept = set(model.state_dict())
    slices = [Slice(f"model/{n}", tuple(p.shape), "float32", 0, p.detach().numpy().reshape(-1).copy())
              for n, p in model.named_parameters()]
    slices += [Slice(f"buffer/{n}", tuple(b.shape), "float32", 0, b.numpy().reshape(-1).copy())
               for n, b in model.named_buffers() if n in kept]
    store.write_rank(3, 0, slices)
    store.commit(3, 1, {"next_sample": 12, "step": 3, "config": to_yaml(cfg)}, timeout_s=5)
    return model.eval(), store.step_path(3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _trained_checkpoint(root / name, ov) for name, ov in VARIANTS.items()}


def _export(step, out, *extra, capsys=None):
    code = main(["ckpt", "export", step, str(out), *extra])
    assert code == 0
    return out


def _load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched keys
    return model.eval()


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant,cls", [("dense", "LlamaForCausalLM"), ("mixtral", "MixtralForCausalLM"),
                                         ("glm4_moe", "Glm4MoeForCausalLM")])
def test_export_loads_into_the_class_that_computes_the_same_logits(checkpoints, tmp_path, variant, cls, capsys):
    model, step = checkpoints[variant]
    out = _export(step, tmp_path / "out")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert cls in capsys.readouterr().out
    hf = _load(out)
    assert type(hf).__name__ == cls
    with torch.no_grad():
        ours, theirs = model(_tokens()), hf(_tokens()).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    names = set(read_safetensors(str(out / "model.safetensors")))
    biases = [n for n in names if "e_score_correction_bias" in n]
    assert bool(biases) == (variant == "glm4_moe")  # never a tensor the class does not compute with
    if variant == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
        assert "model.layers.0.block_sparse_moe.gate.weight" in names


def test_a_sharded_bf16_export_loads_and_holds_torchs_bf16_values(checkpoints, tmp_path):
    model, step = checkpoints["mixtral"]
    out = _export(step, tmp_path / "out", "--dtype", "bf16", "--max-shard-gb", "0.00003")  # 30 kB shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = _load(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    ours = model.tok_embeddings.weight.detach()
    np.testing.assert_array_equal(hf.model.embed_tokens.weight.detach().float().numpy(),
                                  ours.to(torch.bfloat16).float().numpy())
    # and back: init_from the sharded bf16 folder gives exactly those values
    back = _model_of(_config(MOE))
    load_into(back, str(out))
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(dict(back.named_parameters())[name].detach().numpy(),
                                      p.detach().to(torch.bfloat16).float().numpy(), err_msg=name)


def test_bf16_rounding_is_torchs():
    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    x[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    ours = to_bfloat16(x.numpy()).bits
    theirs = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours[3:], theirs[3:])
    assert np.isnan(np.float32(0)) or ours[2] == 0x7FC0


def test_a_model_no_class_represents_keeps_documented_names_and_says_why(checkpoints, tmp_path, capsys):
    model, step = checkpoints["unnormalised"]
    out = _export(step, tmp_path / "out")
    err = capsys.readouterr().err
    assert "no transformers class computes this model exactly" in err and "moe.norm_topk_prob=false" in err
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tierzero_moe" and config["architectures"] == []
    names = set(read_safetensors(str(out / "model.safetensors")))
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert not [n for n in names if "e_score_correction_bias" in n]  # the bias is off: not written
    back = _model_of(_config(VARIANTS["unnormalised"]))
    load_into(back, str(out))
    with torch.no_grad():
        assert torch.equal(back.eval()(_tokens()), model(_tokens()))


def test_the_single_file_form_still_works(checkpoints, tmp_path):
    model, step = checkpoints["mixtral"]
    out = _export(step, tmp_path / "weights.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["weights.safetensors"]
    back = _model_of(_config(MOE))
    load_into(back, str(out))
    assert torch.equal(back.blocks[1].mlp.experts.w_down, model.blocks[1].mlp.experts.w_down)


def test_export_refuses_a_folder_that_is_not_empty(checkpoints, tmp_path, capsys):
    _, step = checkpoints["dense"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["ckpt", "export", step, str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left beside it


# ---- init_from and model.from_hf from transformers' own save_pretrained -------------------------------

def _published_llama(folder: Path, **config):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_theta=5000.0, tie_word_embeddings=False, **config)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(folder), max_shard_size="20KB")
    return model


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama") / "llama-tiny"
    return folder, _published_llama(folder)


def test_from_hf_builds_the_shape_and_init_from_reads_the_bf16_shards_exactly(llama_folder):
    folder, hf = llama_folder
    assert (folder / "model.safetensors.index.json").is_file()
    cfg = load_config(["dense_tiny_cpu"], ["launcher.nproc=1", f"model.from_hf={folder}"])
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.ffn_hidden, m.rope_theta, m.tie_embeddings) == (32, 2, 2, 48, 5000.0,
                                                                                                 False)
    assert cfg.data.vocab_size == VOCAB and cfg.moe.num_experts == 0 and cfg.checkpoint.init_from == str(folder)
    ours = _model_of(cfg)
    load_into(ours, cfg.checkpoint.init_from)
    np.testing.assert_array_equal(ours.blocks[1].attn.wqkv.weight.detach().numpy()[32:64],
                                  hf.model.layers[1].self_attn.k_proj.weight.float().detach().numpy())
    hf32 = hf.float().eval()
    with torch.no_grad():
        assert (ours.eval()(_tokens()) - hf32(_tokens()).logits).abs().max().item() < 1e-5


def test_from_hf_reads_a_mixtral_config(tmp_path):
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    cfg.save_pretrained(str(tmp_path))
    run = load_config(["moe_tiny_cpu"], ["launcher.nproc=2", f"model.from_hf={tmp_path}"])
    assert (run.moe.num_experts, run.moe.top_k, run.moe.gate, run.moe.expert_hidden) == (4, 2, "softmax", 24)
    assert run.moe.norm_topk_prob and run.moe.shared_experts == 0 and run.model.n_layers == 1


@pytest.mark.parametrize("field,value,words", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling="),
    ("num_key_value_heads", 1, "num_key_value_heads=1 (grouped-query attention"),
    ("attention_bias", True, "attention_bias=True"),
])
def test_from_hf_refuses_what_tierzero_does_not_compute(tmp_path, capsys, field, value, words):
    config = json.loads(transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                                 intermediate_size=48, num_hidden_layers=1).to_json_string())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"model.from_hf={tmp_path}: config.json sets .*{re.escape(words)}"):
        load_config(["dense_tiny_cpu"], [f"model.from_hf={tmp_path}"])
    run_dir = tmp_path / "run"
    assert main(["run", "dense_tiny_cpu", f"model.from_hf={tmp_path}", f"run.dir={run_dir}"]) == 2
    assert words.split(" (")[0] in capsys.readouterr().err and not run_dir.exists()


# ---- hostile folders: an index is never trusted ---------------------------------------------------------

def _folder_with_index(tmp_path: Path, weight_map: dict) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    write_safetensors(str(folder / "a.safetensors"), {"model.norm.weight": np.ones(4, np.float32)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("name,words", [
    ("../a.safetensors", "plain file name"), ("/etc/passwd", "plain file name"), ("sub/a.safetensors", "plain file"),
    (".hidden.safetensors", "plain file name"), ("link.safetensors", "resolves outside the folder"),
    ("inner-link.safetensors", "symbolic link"),
    ("missing.safetensors", "No such file"), (7, "plain file name"),
])
def test_an_index_naming_anything_but_a_shard_in_the_folder_is_refused(tmp_path, name, words):
    folder = _folder_with_index(tmp_path, {"model.norm.weight": name})
    outside = tmp_path / "outside.safetensors"
    write_safetensors(str(outside), {"model.norm.weight": np.ones(4, np.float32)})
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "inner-link.safetensors").symlink_to(folder / "a.safetensors")  # inside, but still a link
    with pytest.raises((InitFromError, ValueError, OSError), match=words):
        read_weights(str(folder))
    model = torch.nn.Module()
    model.norm = torch.nn.LayerNorm(4, bias=False)
    with pytest.raises(InitFromError, match=r"^checkpoint\.init_from=.*cannot be read"):
        load_into(model, str(folder))


def test_a_shard_holding_tensors_its_index_does_not_give_it_is_refused(tmp_path):
    folder = _folder_with_index(tmp_path, {"model.embed_tokens.weight": "a.safetensors"})
    with pytest.raises(ValueError, match="does not hold the tensors"):
        read_weights(str(folder))


def test_a_bf16_file_reads_exactly_and_a_bad_bf16_size_is_refused(tmp_path):
    values = torch.randn(6).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [6], "data_offsets": [0, 12]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits.tobytes())
    np.testing.assert_array_equal(read_safetensors(str(path))["w"], values.float().numpy())
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits.tobytes()[:10])
    with pytest.raises(ValueError, match="data_offsets"):
        read_safetensors(str(path))
