"""HMHN blocks and model: shapes, gradients, ablation switches, torchvision layout, overfitting, export.

Kept small for 2 shared CPU cores: 64-112 px inputs and batches of 2-4; 224 px only for shapes.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hmhn import HMHN, HMHNConfig, HMHNOutput, HMHNScorer, LossConfig, ResNet18, export_scorer, hmhn_loss
from hmhn.blocks.feature_fusion import DeepFeatureFusion
from hmhn.blocks.grid_attention import GridWiseAttention, merge_cells, paint_cell_weights, split_into_cells

SMALL = 64  # smallest size that keeps a 4x4 grid of 16 px cells and a 2x2 trunk map


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """One intra-op thread: these tiny tensors gain nothing from two, and on a shared 2-core machine
    OpenMP's spin-waiting threads made every test ~10x slower (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _open_dff_gate(model: HMHN, gamma: float = 0.5) -> None:
    """The residual DFF starts at gamma = 0 (output == x); open it so GWA/DFF influence the output."""
    if model.dff is not None and model.dff.variant == "residual":
        with torch.no_grad():
            model.dff.gamma.fill_(gamma)


# ----------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("size, side", [(224, 7), (112, 4)])
def test_output_shapes(size, side):
    torch.manual_seed(0)
    model = HMHN(HMHNConfig(input_size=size)).eval()
    with torch.no_grad():
        out = model(_images(2, size))
    assert isinstance(out, HMHNOutput)
    assert out.score.shape == (2,) and out.score.dtype == torch.float32
    assert out.heads.shape == (2, 4, 512)
    assert out.attention_maps.shape == (2, 4, side, side)
    assert out.fused.shape == (2, 512)
    assert out.partition_applies
    assert model.config.feature_map_size == side


def test_default_is_paper_config_and_param_budget():
    model = HMHN()
    assert model.config == HMHNConfig()
    assert (model.config.input_size, model.config.num_heads) == (224, 4)
    counts = model.parameter_counts()
    assert counts["backbone"] == 11_176_512          # torchvision resnet18 (11,689,512) minus fc (513,000)
    assert counts["mab"] == 4 * 2_135_904
    assert counts["gwa"] < 2_000 and counts["dff"] < 2_000   # the grid split has no parameters
    assert counts["afb"] == 0
    assert 19_000_000 <= counts["total"] <= 21_000_000
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


# ------------------------------------------------------------------------ configurations (timm style)

CONFIGS = {
    "default": {},
    "heads1": {"num_heads": 1},
    "heads2": {"num_heads": 2},
    "no_gwa": {"use_gwa": False},
    "no_dff": {"use_dff": False},
    "dff_sigmoid": {"dff_variant": "sigmoid"},
    "no_mab": {"use_mab": False},
    "no_afb": {"use_afb": False},
    "trunk_only": {"use_gwa": False, "use_dff": False, "use_mab": False, "use_afb": False},
    "dropout": {"dropout": 0.3},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_forward_backward(name):
    torch.manual_seed(0)
    config = HMHNConfig(input_size=SMALL, initial_score=20.0, **CONFIGS[name])
    model = HMHN(config).train()
    _open_dff_gate(model)
    out = model(_images(2, SMALL))
    k = config.effective_heads
    assert out.score.shape == (2,)
    assert out.heads.shape == (2, k, 512)
    assert out.attention_maps.shape == (2, k, 2, 2)
    assert out.partition_applies == (config.use_afb and k > 1)
    for tensor in (out.score, out.heads, out.attention_maps, out.fused):
        assert torch.isfinite(tensor).all()
    total, parts = hmhn_loss(out, torch.tensor([10.0, 40.0]))  # mean != initial_score: biases get a gradient
    assert torch.isfinite(total)
    total.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {param_name} got an all-zero gradient"


def test_residual_dff_starts_as_identity_and_only_gamma_learns_first():
    torch.manual_seed(0)
    model = HMHN(HMHNConfig(input_size=SMALL)).train()
    x = _images(2, SMALL)
    assert torch.equal(model.trunk_input(x), x)
    hmhn_loss(model(x), torch.tensor([5.0, 40.0]))[0].backward()
    assert model.dff.gamma.grad.abs() > 0    # the gate can open; the rest follows once it has


# --------------------------------------------------------------------------------------- ablations

ABLATIONS = {  # switch -> prefixes of the parameters it must remove
    "use_gwa": ("gwa.",),
    "use_dff": ("dff.",),
    "use_mab": ("mab.",),
    "use_afb": (),          # AFB (log-softmax + sum) has no parameters: only the output changes
}


@pytest.mark.parametrize("switch", list(ABLATIONS))
@pytest.mark.parametrize("dff_variant", ["residual", "sigmoid"])
def test_ablation_switch_removes_its_block(switch, dff_variant):
    torch.manual_seed(0)
    full = HMHN(HMHNConfig(input_size=SMALL, dff_variant=dff_variant)).eval()
    _open_dff_gate(full)
    ablated = HMHN(HMHNConfig(input_size=SMALL, dff_variant=dff_variant, **{switch: False})).eval()
    full_state, ablated_state = full.state_dict(), ablated.state_dict()
    removed = set(full_state) - set(ablated_state)
    assert set(ablated_state) <= set(full_state), "an ablation must not add parameters"
    assert {k for k in removed if not k.startswith(ABLATIONS[switch])} == set()
    if ABLATIONS[switch]:
        assert removed and all(any(k.startswith(p) for k in removed) for p in ABLATIONS[switch])
        assert getattr(ablated, switch.removeprefix("use_")) is None
        assert ablated.parameter_counts()["total"] < full.parameter_counts()["total"]
    else:
        assert ablated.afb is None
        assert ablated.parameter_counts()["total"] == full.parameter_counts()["total"]
    # Same weights for everything both have: any output difference comes from the removed block.
    ablated.load_state_dict({k: full_state[k] for k in ablated_state}, strict=True)
    x = _images(2, SMALL)
    with torch.no_grad():
        assert not torch.allclose(full(x).score, ablated(x).score, rtol=1e-4, atol=1e-4)


def test_gwa_off_keeps_dff_fusing_x_with_itself():
    torch.manual_seed(0)
    model = HMHN(HMHNConfig(input_size=SMALL, use_gwa=False)).eval()
    _open_dff_gate(model)
    x = _images(2, SMALL)
    with torch.no_grad():
        assert torch.allclose(model.trunk_input(x), model.dff(x, x))


@pytest.mark.parametrize("overrides", [{"num_heads": 1}, {"use_afb": False}, {"use_mab": False}])
def test_partition_loss_off_without_competing_heads(overrides):
    torch.manual_seed(0)
    model = HMHN(HMHNConfig(input_size=SMALL, **overrides)).train()
    out = model(_images(2, SMALL))
    assert not out.partition_applies
    total, parts = hmhn_loss(out, torch.tensor([1.0, 2.0]), LossConfig(partition_weight=1.0))
    assert parts["partition"].item() == 0.0
    assert torch.allclose(total, parts["regression"])


# ---------------------------------------------------------------------------------------- GWA pieces

def test_grid_split_and_merge_keep_cells_in_place():
    grid, cell = 4, 3
    # Cell (r, c) filled with its index r*grid + c, per channel offset by 100*channel.
    index = torch.arange(grid * grid, dtype=torch.float32).view(grid, grid)
    image = index.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    image = torch.stack([image + 100 * ch for ch in range(3)]).unsqueeze(0)     # 1,3,12,12
    cells = split_into_cells(image, grid)
    assert cells.shape == (1, 16, 3, cell, cell)
    for g in range(16):
        for ch in range(3):
            assert torch.all(cells[0, g, ch] == g + 100 * ch)
    assert torch.equal(merge_cells(cells, grid), image)
    weights = torch.arange(16, dtype=torch.float32).view(1, 16, 1).expand(1, 16, 3)
    assert torch.equal(paint_cell_weights(weights, grid, cell, cell), image[:, :1].expand(1, 3, 12, 12))


def test_gwa_weights_compete_across_cells():
    torch.manual_seed(0)
    gwa = GridWiseAttention(grid=4).train()
    x = _images(2, SMALL)
    weights = gwa.cell_weights(x)
    assert weights.shape == (2, 16, 3)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2, 3), atol=1e-5)
    out = gwa(x)
    # Cell (1, 2) of the output is that cell of x scaled by its own weight.
    r, c, cs = 1, 2, SMALL // 4
    region = (slice(None), 0, slice(r * cs, (r + 1) * cs), slice(c * cs, (c + 1) * cs))
    assert torch.allclose(out[region], x[region] * weights[:, r * 4 + c, 0].view(2, 1, 1))
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in gwa.modules())
    with pytest.raises(ValueError, match="grid"):
        gwa(torch.randn(2, 3, 30, 30))


def test_sigmoid_dff_outputs_a_normalised_image():
    torch.manual_seed(0)
    dff = DeepFeatureFusion("sigmoid").eval()
    x = _images(2, 32)
    y = dff(x, x)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    pixels = y * std + mean
    assert pixels.min() >= 0 and pixels.max() <= 1


def test_config_validation():
    with pytest.raises(ValueError):
        HMHNConfig(input_size=102)          # not divisible into a 4x4 grid
    with pytest.raises(ValueError):
        HMHNConfig(input_size=16)
    with pytest.raises(ValueError):
        HMHNConfig(num_heads=0)
    with pytest.raises(ValueError):
        HMHNConfig(dff_variant="feature")
    with pytest.raises(dataclasses.FrozenInstanceError):
        HMHNConfig().num_heads = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="expects"):
        HMHN(HMHNConfig(input_size=SMALL))(torch.randn(2, 1, SMALL, SMALL))


# ----------------------------------------------------------------------------------- backbone loading

# Real torchvision resnet18 key names (torchvision.models.resnet18().state_dict(): 122 entries).
TORCHVISION_KEYS_SAMPLE = (
    "conv1.weight", "bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "layer1.0.conv1.weight",
    "layer1.1.bn2.running_var", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.bias",
    "layer3.1.conv2.weight", "layer4.0.downsample.1.running_mean", "layer4.1.bn2.bias", "fc.weight", "fc.bias",
)


def _torchvision_layout_state(seed: int, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    reference = ResNet18(num_classes)
    with torch.no_grad():  # non-default BN statistics, so the test sees that buffers load too
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(7)
    return reference.state_dict()


def test_resnet18_has_torchvision_layout():
    state = _torchvision_layout_state(0)
    assert len(state) == 122
    assert set(TORCHVISION_KEYS_SAMPLE) <= set(state)
    assert sum(p.numel() for p in ResNet18().parameters()) == 11_689_512


# Loading checkpoints into the trunk (and DAN's heads into MAB): tests/test_checkpoint.py.


# ------------------------------------------------------------------------------------------ training

def test_overfits_a_tiny_batch():
    # 64 px keeps this affordable on 2 shared cores; the whole model (all blocks, 4 heads) trains.
    torch.manual_seed(0)
    target = torch.tensor([3.0, 17.0, 30.0, 48.0])
    model = HMHN(HMHNConfig(input_size=SMALL, initial_score=float(target.mean()))).train()
    x = _images(4, SMALL, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(16):
        total, _ = hmhn_loss(model(x), target)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert min(losses[-3:]) < 0.1 * losses[0], losses


def test_channels_last_bf16_autocast():
    torch.manual_seed(0)
    model = HMHN(HMHNConfig(input_size=SMALL)).train().to(memory_format=torch.channels_last)
    _open_dff_gate(model)
    x = _images(2, SMALL).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        total, _ = hmhn_loss(out, torch.tensor([10.0, 20.0]))
    assert out.score.dtype == torch.float32 and torch.isfinite(out.score).all()
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------- inference/export

def test_scorer_clamps_and_gives_attention_maps():
    torch.manual_seed(0)
    model = HMHN(HMHNConfig(input_size=SMALL, initial_score=1000.0))
    scorer = HMHNScorer(model).eval()
    assert not model.training
    x = _images(3, SMALL)
    with torch.no_grad():
        assert torch.all(scorer(x) == 63.0)
        assert torch.all(HMHNScorer(model, clamp=False)(x) > 63.0)
        low = HMHN(HMHNConfig(input_size=SMALL, initial_score=-1000.0))  # and the floor: BDI-II is never < 0
        assert torch.all(HMHNScorer(low).eval()(x) == 0.0) and torch.all(HMHNScorer(low, clamp=False).eval()(x) < 0)
    maps = scorer.attention_maps(x)
    assert maps.shape == (3, 4, 2, 2)
    rendered = scorer.attention_maps(x, size=SMALL, normalise=True)
    assert rendered.shape == (3, 4, SMALL, SMALL)
    assert rendered.min() >= 0 and rendered.max() <= 1


def test_torch_export_matches_eager_with_dynamic_batch():
    torch.manual_seed(0)
    # Unclamped, so that the comparison sees real scores (eval-mode scores of an untrained model
    # are far outside 0..63); clamping is checked above.
    scorer = HMHNScorer(HMHN(HMHNConfig(input_size=112, initial_score=20.0)), clamp=False)
    program = export_scorer(scorer, _images(2, 112))
    exported = program.module()
    for batch in (1, 3):
        x = _images(batch, 112, seed=batch)
        with torch.no_grad():
            eager = scorer(x)
            result = exported(x)
        assert result.shape == (batch,)
        assert torch.allclose(result, eager, rtol=1e-4, atol=1e-3)
