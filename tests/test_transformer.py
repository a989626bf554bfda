"""The FLUX transformer equals diffusers' FluxTransformer2DModel, and has the official names and shapes."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from minflux.convert import transformer_from_diffusers
from minflux.layers import rope
from minflux.model import Flux, FluxParams, preset


def reference_and_ours(guidance_embed: bool, seed: int = 0):
    """A tiny random diffusers transformer, and ours carrying the same weights through the diffusers->BFL
    table."""
    torch.manual_seed(seed)
    p = preset("tiny", guidance_embed=guidance_embed)
    ref = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=guidance_embed, axes_dims_rope=p.axes_dim).eval()
    with torch.no_grad():  # diffusers initialises norms to 1 and some linears to 0: make every tensor matter
        for t in ref.parameters():
            t.copy_(torch.randn_like(t) * 0.3)
    ours = Flux(p).eval()
    ours.load_state_dict(transformer_from_diffusers(ref.state_dict()), strict=True)
    return ref, ours


def inputs(p: FluxParams, batch=2, h=3, w=5, n_txt=7):
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return dict(img=torch.randn(batch, h * w, p.in_channels, generator=g),
                img_ids=img_ids.reshape(1, h * w, 3),
                txt=torch.randn(batch, n_txt, p.context_in_dim, generator=g),
                txt_ids=torch.zeros(1, n_txt, 3),
                timesteps=torch.tensor([0.9, 0.35]),
                y=torch.randn(batch, p.vec_in_dim, generator=g),
                guidance=torch.tensor([3.5, 1.0]))


def run_both(ref, ours, x):
    with torch.no_grad():
        want = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                   timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                   guidance=x["guidance"] if ref.config.guidance_embeds else None).sample
        batched_ids = {"img_ids": x["img_ids"].expand(2, -1, -1), "txt_ids": x["txt_ids"].expand(2, -1, -1)}
        got = ours(**{**x, **batched_ids})
    return got, want


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_transformer_matches_diffusers(guidance_embed):
    ref, ours = reference_and_ours(guidance_embed)
    got, want = run_both(ref, ours, inputs(ours.params))
    diff = (got - want).abs()
    print(f"transformer ({'dev' if guidance_embed else 'schnell'}): max abs diff {diff.max():.2e}, "
          f"mean {diff.mean():.2e}, output scale {want.abs().mean():.2e}")
    assert got.shape == want.shape
    assert diff.max() < 1e-5


def test_guidance_distilled_model_requires_guidance():
    _, ours = reference_and_ours(guidance_embed=True)
    x = inputs(ours.params)
    x["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        ours(**x)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = reference_and_ours(guidance_embed=True)
    x = inputs(ours.params)
    grads = []
    for checkpointing in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = checkpointing
        ours(**x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def meta_shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# FLUX.1 Fill-dev is dev with img_in taking 384 channels (BFL's util.py configs "flux-dev-fill": in_channels
# 384, out_channels 64); Kontext-dev has dev's config ("flux-dev-kontext"), so the dev case covers it.
@pytest.mark.parametrize("name,in_channels,tensors,params", [("flux-dev", 64, 780, 11_901_408_320),
                                                             ("flux-schnell", 64, 776, 11_891_178_560),
                                                             ("flux-dev", 384, 780, 11_902_391_360)])
def test_full_size_transformer_has_official_names_and_shapes(name, in_channels, tensors, params):
    with torch.device("meta"):
        ours = Flux(preset(name, in_channels=in_channels))
        ref = FluxTransformer2DModel(guidance_embeds=name == "flux-dev", in_channels=in_channels,
                                     out_channels=64)
    shapes = meta_shapes(ours)
    assert len(shapes) == tensors
    assert sum(p.numel() for p in ours.parameters()) == params
    assert shapes["img_in.weight"] == (3072, in_channels)
    assert shapes["final_layer.linear.weight"] == (64, 3072)
    assert shapes["double_blocks.18.img_attn.qkv.weight"] == (9216, 3072)
    assert shapes["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert shapes["single_blocks.37.linear2.weight"] == (3072, 15360)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    # the diffusers layout of the same model converts onto exactly our names and shapes
    converted = transformer_from_diffusers(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes


def test_params_are_read_off_checkpoint_shapes():
    with torch.device("meta"):
        for name in ("flux-dev", "flux-schnell", "tiny", "mid"):
            p = preset(name)
            assert FluxParams.from_state_dict(Flux(p).state_dict(), axes_dim=p.axes_dim) == p


def test_a_non_flux_checkpoint_is_rejected_with_the_missing_keys():
    with pytest.raises(ValueError, match="missing img_in.weight"):
        FluxParams.from_state_dict({"encoder.conv_in.weight": torch.zeros(1)})


class DtypeDeviceLog(TorchDispatchMode):
    """Records (dtype, device type) of every tensor each op returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [(t.dtype, t.device.type) for t in (out if isinstance(out, (tuple, list)) else [out])
                         if isinstance(t, torch.Tensor)]
        return out


def test_rope_table_makes_no_float64_tensor_on_mps():
    """MPS has no float64: for positions there the angles are computed on the CPU, then moved."""
    with FakeTensorMode():  # an MPS tensor without a Mac: ops only propagate dtypes and devices
        positions = torch.zeros(1, 10, device="mps")                                    # (B, L)
        with DtypeDeviceLog() as log:
            table = rope(positions, 56, 10_000)
    assert table.device.type == "mps" and table.dtype == torch.float32 and table.shape == (2, 1, 10, 56)
    assert (torch.float64, "cpu") in log.outputs
    assert not [o for o in log.outputs if o[0] == torch.float64 and o[1] != "cpu"]


def test_each_block_traces_into_one_graph_without_complex_tensors():
    """torch.compile sees a block whole (no graph break), and RoPE in real arithmetic (Inductor cannot
    generate code for complex operators)."""
    flux = Flux(preset("tiny")).eval()
    x = inputs(flux.params)
    img, txt, vec = flux.img_in(x["img"]), flux.txt_in(x["txt"]), flux.vector_in(x["y"])
    pe = flux.pe_embedder(torch.cat([x["txt_ids"], x["img_ids"]], dim=1).expand(2, -1, -1))
    for block, args in ((flux.double_blocks[0], (img, txt, vec, pe)),
                        (flux.single_blocks[0], (torch.cat([txt, img], dim=1), vec, pe))):
        explanation = torch._dynamo.explain(block)(*args)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        nodes = [node for graph in explanation.graphs for node in graph.graph.nodes]
        values = [node.meta.get("example_value") for node in nodes]
        assert not [v for v in values if isinstance(v, torch.Tensor) and v.is_complex()]
