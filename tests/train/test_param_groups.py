"""blipfast.train.param_groups against the references' own rules, restated below on tiny models named as theirs:
Salesforce BLIP's ``AdamW(model.parameters(), ...)``, LAVIS' ``BaseModel.get_optimizer_params`` and
``Blip2Base.get_optimizer_params`` with the ViTs' ``get_num_layer`` (``eva_vit.py``, ``clip_vit.py``)."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

from blipfast.train import param_groups as G

# ---- tiny models with the references' names ------------------------------------------------------------------


class EvaBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn.q_bias = nn.Parameter(torch.zeros(d))
        self.attn.v_bias = nn.Parameter(torch.zeros(d))
        self.attn.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Linear(2 * d, d))


class EvaViT(nn.Module):
    def __init__(self, d=4, depth=3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, 2)
        self.rel_pos_bias = nn.Module()
        self.rel_pos_bias.relative_position_bias_table = nn.Parameter(torch.zeros(7, 2))
        self.blocks = nn.ModuleList(EvaBlock(d) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(d)

    def get_num_layer(self, var_name=""):  # lavis/models/eva_vit.py
        if var_name in ("cls_token", "mask_token", "pos_embed"):
            return 0
        elif var_name.startswith("patch_embed"):
            return 0
        elif var_name.startswith("rel_pos_bias"):
            return len(self.blocks) - 1
        elif var_name.startswith("blocks"):
            layer_id = int(var_name.split('.')[1])
            return layer_id + 1
        else:
            return len(self.blocks)


class ClipViT(nn.Module):
    def __init__(self, d=4, depth=2):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.positional_embedding = nn.Parameter(torch.zeros(5, d))
        self.conv1 = nn.Conv2d(3, d, 2, 2, bias=False)
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            nn.ModuleDict({"ln_1": nn.LayerNorm(d), "attn": nn.Linear(d, d), "mlp": nn.Linear(d, d)})
            for _ in range(depth))

    def get_num_layer(self, var_name=""):  # lavis/models/clip_vit.py
        if var_name in ("class_embedding", "positional_embedding", "conv1", "ln_pre"):
            return 0
        elif var_name.startswith("transformer.resblocks"):
            layer_id = int(var_name.split('.')[2])
            return layer_id + 1
        else:
            return len(self.transformer.resblocks)


class Blip2Like(nn.Module):
    """Blip2Qformer's parameter kinds: a ViT, ln_vision, a Q-Former with LayerNorms and biases, query_tokens,
    projections, the 0-d temp, and a frozen parameter."""

    def __init__(self, vit, d=4, freeze_vit=False):
        super().__init__()
        self.visual_encoder = vit
        self.ln_vision = nn.LayerNorm(d)
        self.Qformer = nn.Module()
        self.Qformer.bert = nn.ModuleDict({"LayerNorm": nn.LayerNorm(d), "query": nn.Linear(d, d)})
        self.query_tokens = nn.Parameter(torch.zeros(1, 3, d))
        self.vision_proj = nn.Linear(d, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)
        if freeze_vit:
            self.visual_encoder.requires_grad_(False)

    def get_optimizer_params(self, weight_decay, lr_scale=1):  # lavis/models/blip2_models/blip2.py
        vit_num_layers = self.visual_encoder.get_num_layer()
        lr_scales = list(lr_scale ** (vit_num_layers + 1 - i) for i in range(vit_num_layers + 2))
        parameter_group_names = {}
        parameter_group_vars = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue  # frozen weights
            if len(param.shape) == 1 or name.endswith(".bias"):
                group_name = "no_decay"
                this_weight_decay = 0.
            else:
                group_name = "decay"
                this_weight_decay = weight_decay
            if 'visual_encoder' in name:
                layer_id = self.visual_encoder.get_num_layer(name.replace('visual_encoder.', ''))
                group_name = "vit_layer_%d_%s" % (layer_id, group_name)
            else:
                layer_id = None
            if group_name not in parameter_group_names:
                if layer_id is not None:
                    scale = lr_scales[layer_id]
                else:
                    scale = 1
                parameter_group_names[group_name] = {"weight_decay": this_weight_decay, "params": [],
                                                     "lr_scale": scale}
                parameter_group_vars[group_name] = {"weight_decay": this_weight_decay, "params": [],
                                                    "lr_scale": scale}
            parameter_group_vars[group_name]["params"].append(param)
            parameter_group_names[group_name]["params"].append(name)
        return list(parameter_group_vars.values())


def lavis_base_get_optimizer_params(model, weight_decay, lr_scale=1):  # lavis/models/base_model.py
    p_wd, p_non_wd = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen weights
        if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n:
            p_non_wd.append(p)
        else:
            p_wd.append(p)
    return [{"params": p_wd, "weight_decay": weight_decay, "lr_scale": lr_scale},
            {"params": p_non_wd, "weight_decay": 0, "lr_scale": lr_scale}]


def listed(groups, model):
    """Each group as (weight_decay, lr_scale, parameter names), exact."""
    names = G.group_names(groups, model.named_parameters())
    return [(g["weight_decay"], g.get("lr_scale"), n) for g, n in zip(groups, names)]


# ---- against the references --------------------------------------------------------------------------------------

@pytest.mark.parametrize("lr_scale", [1, 0.95, 0.5])
@pytest.mark.parametrize("vit,kind", [(EvaViT, "eva"), (ClipViT, "clip")])
def test_blip2_groups_are_lavis_blip2base(vit, kind, lr_scale):
    model = Blip2Like(vit())
    ref = model.get_optimizer_params(0.05, lr_scale)
    num_layers = model.visual_encoder.get_num_layer()
    got = G.lavis_blip2_groups(model.named_parameters(), 0.05, lr_scale, vit=G.ViTLayers(kind, num_layers))
    assert listed(got, model) == listed(ref, model)
    decay = {n for wd, _, names in listed(got, model) if wd for n in names}
    assert "temp" in decay and "query_tokens" in decay  # 0-d and 3-d parameters decay under BLIP-2's rule
    assert "ln_vision.weight" not in decay and "frozen" not in [n for *_, ns in listed(got, model) for n in ns]


def test_blip2_groups_with_a_frozen_vit_are_two_groups():
    model = Blip2Like(EvaViT(), freeze_vit=True)
    ref = model.get_optimizer_params(0.05, 0.95)
    got = G.lavis_blip2_groups(model.named_parameters(), 0.05, 0.95, vit=G.ViTLayers("eva", 3))
    assert listed(got, model) == listed(ref, model) and len(got) == 2
    assert listed(G.lavis_blip2_groups(model.named_parameters(), 0.05), model) == listed(ref, model)


def test_eva_layer_ids_and_scales():
    model = Blip2Like(EvaViT(depth=3))
    got = G.lavis_blip2_groups(model.named_parameters(), 0.05, 0.9, vit=G.ViTLayers("eva", 3))
    by_name = {n: scale for _, scale, names in listed(got, model) for n in names}
    assert by_name["visual_encoder.cls_token"] == 0.9 ** 4  # layer 0
    assert by_name["visual_encoder.blocks.0.attn.qkv.weight"] == 0.9 ** 3  # layer 1
    assert by_name["visual_encoder.rel_pos_bias.relative_position_bias_table"] == 0.9 ** 2  # layer L - 1
    assert by_name["visual_encoder.blocks.2.mlp.0.weight"] == 0.9 ** 1  # the last block: layer L
    assert by_name["visual_encoder.fc_norm.weight"] == 0.9 ** 1  # anything else: layer L too
    assert by_name["ln_vision.weight"] == 1 and by_name["temp"] == 1
    # LAVIS tests `'visual_encoder' in name` and strips 'visual_encoder.' anywhere: under a wrapper (a DDP module.)
    # every ViT parameter falls to "anything else", layer L
    vit = G.ViTLayers("eva", 3)
    assert vit("module.visual_encoder.blocks.0.norm1.weight") == 3 and vit("module.visual_encoder.cls_token") == 3
    assert vit("visual_encoder.blocks.0.norm1.weight") == 1 and vit("ln_vision.weight") is None


@pytest.mark.parametrize("lr_scale", [1, 0.5])
def test_lavis_base_groups_are_lavis_basemodel(lr_scale):
    model = Blip2Like(EvaViT())
    model.kiln = nn.Linear(2, 2)  # 2-d weights whose names hold "ln" / "bn" / "bias": no decay in LAVIS' rule
    model.abnormal = nn.Parameter(torch.zeros(2, 2))
    model.biasing = nn.Parameter(torch.zeros(2, 2))
    ref = lavis_base_get_optimizer_params(model, 0.05, lr_scale)
    got = G.lavis_groups(model.named_parameters(), 0.05, lr_scale)
    assert listed(got, model) == listed(ref, model)
    no_decay = set(listed(got, model)[1][2])
    assert {"kiln.weight", "abnormal", "biasing", "temp"} <= no_decay


def test_blip_groups_decay_everything_trainable():
    model = Blip2Like(EvaViT())
    (group,) = G.blip_groups(model.named_parameters(), 0.05)
    assert group["weight_decay"] == 0.05
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert G.group_names([group], model.named_parameters()) == [trainable]


def test_hf_vision_model_names_follow_the_eva_rule():
    from transformers import Blip2VisionConfig, Blip2VisionModel

    cfg = Blip2VisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                            image_size=8, patch_size=4)
    model = nn.Module()
    model.vision_model = Blip2VisionModel(cfg)
    model.ln_vision = nn.LayerNorm(8)
    model.temp = nn.Parameter(torch.tensor(0.07))
    vit = G.ViTLayers("hf", 2, prefix="vision_model")
    expect = {"vision_model.embeddings.class_embedding": 0, "vision_model.embeddings.position_embedding": 0,
              "vision_model.embeddings.patch_embedding.weight": 0, "vision_model.encoder.layers.0.mlp.fc1.weight": 1,
              "vision_model.encoder.layers.1.self_attn.qkv.bias": 2, "vision_model.post_layernorm.weight": None,
              "ln_vision.weight": None, "temp": None}
    assert {n: vit(n) for n in expect} == expect
    names = {n for n, _ in model.named_parameters()}
    assert set(expect) - {"ln_vision.weight", "temp"} <= names
    groups = G.lavis_blip2_groups(model.named_parameters(), 0.05, 0.95, vit=vit)
    scales = {n: s for _, s, ns in listed(groups, model) for n in ns}
    assert scales["vision_model.embeddings.class_embedding"] == 0.95 ** 3
    assert scales["vision_model.encoder.layers.1.mlp.fc2.weight"] == 0.95
    assert scales["vision_model.post_layernorm.bias"] == 1
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_names_maps_to_the_reference_names_and_groups_feed_adamw():
    model = Blip2Like(EvaViT())
    renamed = {n: n.replace("visual_encoder", "vit") for n, _ in model.named_parameters()}
    inverse = {v: k for k, v in renamed.items()}
    own = [(renamed[n], p) for n, p in model.named_parameters()]
    got = G.lavis_blip2_groups(own, 0.05, 0.95, vit=G.ViTLayers("eva", 3), names=inverse.__getitem__)
    ref = model.get_optimizer_params(0.05, 0.95)
    assert [[id(p) for p in g["params"]] for g in got] == [[id(p) for p in g["params"]] for g in ref]
    opt = torch.optim.AdamW(got, lr=1e-3)  # the lr_scale key rides along; AdamW ignores it
    sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
    opt.step()
    assert [g["lr_scale"] for g in opt.param_groups] == [g["lr_scale"] for g in ref]
    assert pickle.loads(pickle.dumps(G.ViTLayers("eva", 3)))("visual_encoder.blocks.1.norm1.weight") == 2


def test_bad_arguments_are_named():
    model = Blip2Like(EvaViT())
    with pytest.raises(ValueError, match="weight_decay"):
        G.blip_groups(model.named_parameters(), -0.1)
    with pytest.raises(ValueError, match="kind"):
        G.ViTLayers("swin", 3)
    with pytest.raises(ValueError, match="num_layers"):
        G.ViTLayers("eva", 0)
    with pytest.raises(TypeError, match="vit"):
        G.lavis_blip2_groups(model.named_parameters(), 0.05, vit=lambda n: 0)
    with pytest.raises(TypeError, match="named_parameters"):
        G.lavis_groups(model.parameters(), 0.05)
