"""blipfast.convert's one loader (load_into) and one resolver (resolve_source): every key mapped or reported in one
error format naming the option, HF / LAVIS / blipfast names, prefixes, tied weights, ignored keys; what a path is."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from blipfast import convert


class _Tied(nn.Module):
    """Two Linear layers whose weights are one Parameter (as an LM head tied to its embeddings), a LayerNorm under
    blipfast's ``ln_vision`` name and a position_ids buffer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.ln_vision = nn.LayerNorm(4)
        self.register_buffer("position_ids", torch.arange(4))


def _sd(m: nn.Module) -> dict:
    return {k: torch.randn_like(v.float()) for k, v in m.state_dict().items() if k != "position_ids"}


def test_every_key_lands_and_tied_weights_need_one_key(tmp_path):
    m = _Tied()
    sd = _sd(m)
    sd["b.weight"] = sd["a.weight"].clone()  # both names of the tied weight, equal
    got = convert.load_into(m, sd, what="--init")
    assert got.keys == sorted(sd) and got.absent == []
    assert torch.equal(m.a.weight, sd["a.weight"]) and m.b.weight is m.a.weight
    assert torch.equal(m.ln_vision.weight, sd["ln_vision.weight"])
    one = {k: v for k, v in _sd(m).items() if k != "b.weight"}  # one name of the tied weight is enough
    convert.load_into(m, one)
    assert torch.equal(m.b.weight, one["a.weight"])
    # HF's name of ln_vision, from a .pth under "model", a safetensors file and a Source
    hf = {("vision_model.post_layernorm." + k[10:] if k.startswith("ln_vision.") else k): v for k, v in one.items()}
    torch.save({"model": hf, "epoch": 1}, tmp_path / "w.pth")
    save_file(hf, str(tmp_path / "w.safetensors"))
    for src in (tmp_path / "w.pth", str(tmp_path / "w.safetensors"), convert.resolve_source(tmp_path / "w.pth")):
        fresh = _Tied()
        convert.load_into(fresh, src)
        assert torch.equal(fresh.ln_vision.bias, one["ln_vision.bias"]), src


def test_one_error_format_names_the_option_and_every_problem():
    m = _Tied()
    sd = _sd(m)
    bad = {k: v for k, v in sd.items() if k != "a.bias"}
    bad["typo.weight"] = torch.zeros(1)
    bad["ln_vision.weight"] = torch.zeros(5)
    bad["b.weight"] = sd["a.weight"] + 1  # the tied names disagree
    with pytest.raises(ValueError) as e:
        convert.load_into(m, bad, what="--init", into="the test model")
    msg = str(e.value)
    assert msg.startswith("--init: the weights of the state dict do not fit the test model: ")
    for part in ("lacks 1 key(s): ['a.bias']", "1 checkpoint key(s) do not map to it: ['typo.weight']",
                 "ln_vision.weight [5] in the checkpoint, [4] in the model", "tied key(s) hold different values"):
        assert part in msg, part
    with pytest.raises(ValueError, match="^--resume: .*no such file"):
        convert.load_into(m, "/nonexistent/model.safetensors", what="--resume")
    many = {f"extra{i}": torch.zeros(1) for i in range(30)}
    with pytest.raises(ValueError, match=r"30 checkpoint key\(s\).*\.\.\. \(30 in all\)"):
        convert.load_into(m, dict(sd, **many))


def test_ignore_lets_keys_be_absent_or_extra():
    m = _Tied()
    sd = {k: v for k, v in _sd(m).items() if not k.startswith("ln_vision.") and k != "b.weight"}
    sd["visual_encoder.blocks.0.norm1.weight"] = torch.zeros(3)
    before = m.ln_vision.weight.detach().clone()
    got = convert.load_into(m, sd, ignore=(r"ln_vision\.", r"visual_encoder\."))
    assert got.absent == ["ln_vision.bias", "ln_vision.weight"] and torch.equal(m.ln_vision.weight, before)
    with pytest.raises(ValueError, match="lacks 2 key"):
        convert.load_into(m, sd, ignore=(r"visual_encoder\.",))


def test_lavis_names_are_mapped_and_reported_in_lavis_names():
    from blipfast.testing.retrieval import stage1_config

    from blipfast import Blip2Stage1

    src = Blip2Stage1(stage1_config())
    lavis = src.to_lavis_state_dict()
    dst = Blip2Stage1(stage1_config())
    convert.load_into(dst, lavis)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    lacking = {k: v for k, v in lavis.items() if k != "ln_vision.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 key\(s\): \['ln_vision.weight'\]"):
        convert.load_into(dst, lacking)


def test_prefix_reads_only_its_part_of_a_sharded_checkpoint(tmp_path):
    """The ViT of a composite checkpoint: only the shards holding ``vision_model.*`` are opened (the LLM's shard
    here does not even exist)."""
    vit = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    sd = {f"vision_model.{k}": torch.randn_like(v) for k, v in vit.state_dict().items()}
    save_file(sd, str(tmp_path / "model-1.safetensors"))
    weight_map = {**{k: "model-1.safetensors" for k in sd}, "language_model.w": "model-2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert.load_into(vit, tmp_path, prefix="vision_model.", what="--vision")
    assert torch.equal(vit[1].bias, sd["vision_model.1.bias"])
    with pytest.raises(ValueError, match="--vision"):
        convert.load_into(vit, tmp_path, what="--vision")  # everything: the missing shard


def test_resolve_source_tells_what_a_path_is(tmp_path):
    run = tmp_path / "run"
    ck = run / "checkpoint-00000004"
    ck.mkdir(parents=True)
    (run / "checkpoint-00000002").mkdir()
    (run / "checkpoint-00000002" / "state.pt").write_bytes(b"")
    (ck / "state.pt").write_bytes(b"")
    (ck / "config.json").write_text('{"model_type": "blip-2"}')
    (run / "config.yaml").write_text("stage: 1\nmodel: {embed_dim: 16}\ntokenizer: tok\n")
    src = convert.resolve_source(run)
    assert (src.kind, src.weights, src.checkpoint, src.run_dir) == ("run", str(ck / "model.safetensors"), str(ck),
                                                                    str(run))
    assert src.run_config["model"] == {"embed_dim": 16} and src.hf_config == {"model_type": "blip-2"}
    for given in (ck, ck / "model.safetensors"):
        (ck / "model.safetensors").write_bytes(b"")
        s = convert.resolve_source(given)
        assert (s.kind, s.run_dir, s.checkpoint, s.weights) == ("checkpoint", str(run), str(ck),
                                                                str(ck / "model.safetensors"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "blip"}')
    (hf / "model.safetensors").write_bytes(b"")
    assert convert.resolve_source(hf).kind == "hf" and convert.resolve_source(hf / "model.safetensors").hf_config
    (tmp_path / "x.pth").write_bytes(b"")
    assert convert.resolve_source(tmp_path / "x.pth").kind == "torch"
    assert convert.resolve_source(tmp_path / "hf" / "model.safetensors").kind == "safetensors"
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text("stage: 1\n")
    with pytest.raises(ValueError, match="^--model: .*without a complete checkpoint"):
        convert.resolve_source(empty_run, what="--model")
    with pytest.raises(ValueError, match="^--init: .*does not exist"):
        convert.resolve_source(tmp_path / "nope")
    assert convert.list_checkpoints(run) == [str(run / "checkpoint-00000002"), str(ck)]
