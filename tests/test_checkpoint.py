"""load_backbone_checkpoint with checkpoints as people have them (hmhn/checkpoint.py); no downloads.

Every file is written into tmp_path from a real model's state dict: torchvision-layout ResNet-18
(hmhn.blocks.resnet.ResNet18), old-PyTorch files without num_batches_tracked, DataParallel/DDP prefixes,
training containers with bookkeeping, and DAN's full model, rebuilt below layer for layer after
yaoing/DAN networks/dan.py so that its key names come from the same module structure as DAN's.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hmhn import HMHN, HMHNConfig, ResNet18, load_backbone_checkpoint
from hmhn.checkpoint import LoadReport, read_backbone_state_dict

SMALL = 64
NBT = "num_batches_tracked"
TRUNK_TENSORS = 120     # torchvision resnet18 minus fc.weight / fc.bias
TRUNK_NBT = 20          # BatchNorm2d layers in the trunk
HEAD_NBT = 5            # per MAB/DAN head: 4 BatchNorm2d in the spatial unit, 1 BatchNorm1d in the channel unit


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors, 2 shared cores: a second OpenMP thread only spins
    yield
    torch.set_num_threads(previous)


@torch.no_grad()
def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Non-default values in every parameter and buffer, so a test sees each one load (or not)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if name.endswith(NBT):
            tensor.fill_(7 + seed)
        elif name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return module


def _torchvision_state(seed: int, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    return _randomize(ResNet18(num_classes), seed).state_dict()


def _model(seed: int = 100, **config) -> HMHN:
    torch.manual_seed(seed)
    return HMHN(HMHNConfig(input_size=SMALL, **config))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in actual.items():
        assert torch.equal(value, expected[key]), key


def _assert_backbone_from(model: HMHN, state: dict[str, torch.Tensor], before: dict[str, torch.Tensor] | None = None):
    """Every trunk tensor equals the file's; one the file lacks (num_batches_tracked only) kept its value."""
    for key, value in model.backbone.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key
        else:
            assert key.endswith(NBT) and before is not None and torch.equal(value, before[f"backbone.{key}"]), key


def _save(tmp_path, obj, name: str = "checkpoint.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------ torchvision layout

def test_load_torchvision_state_dict(tmp_path):
    state = _torchvision_state(1)
    path = _save(tmp_path, state, "resnet18.pth")
    model = _model()
    before = _snapshot(model)
    lines = []
    report = load_backbone_checkpoint(model, path, printer=lines.append)
    _assert_backbone_from(model, state)
    assert isinstance(report, LoadReport)
    assert (report.layout, report.container, report.prefix) == ("torchvision", None, "")
    assert (report.backbone_tensors, report.backbone_filled, report.dropped) == (TRUNK_TENSORS, 0, ("fc.*",))
    assert report.heads_loaded == () and report.heads_total == 4
    assert report.left_at_init == ("gwa.*", "dff.*", "mab.*", "regressor.*")   # afb has no state
    for key, value in model.state_dict().items():                                 # and they really are
        if not key.startswith("backbone."):
            assert torch.equal(value, before[key]), key
    assert lines == [str(report)]
    assert lines[0].startswith(f"backbone: {TRUNK_TENSORS} tensors loaded from {path} (layout torchvision")
    assert "MAB heads: 0/4 loaded (no DAN heads in the file)" in lines[0]
    assert lines[0].endswith("left at init: gwa.*, dff.*, mab.*, regressor.*")


def test_old_pytorch_file_without_num_batches_tracked(tmp_path):
    # PyTorch < 0.4.1 had no num_batches_tracked; PyTorch's own strict load accepts such files.
    full = _torchvision_state(2)
    state = {k: v for k, v in full.items() if not k.endswith(NBT)}
    assert len(full) - len(state) == TRUNK_NBT
    path = _save(tmp_path, state, "old.pth")
    model = _model()
    before = _snapshot(model)
    report = load_backbone_checkpoint(model, path, printer=None)
    _assert_backbone_from(model, state, before)
    assert (report.backbone_tensors, report.backbone_filled) == (TRUNK_TENSORS - TRUNK_NBT, TRUNK_NBT)
    assert f"{TRUNK_NBT} num_batches_tracked missing, kept at the model's value" in str(report)
    # the same file through PyTorch's strict load (fc included): accepted there too
    reference = ResNet18()
    reference.load_state_dict(state, strict=True)
    assert read_backbone_state_dict(path).keys() == {k for k in state if not k.startswith("fc.")}


def test_load_dan_msceleb_checkpoint(tmp_path):
    state = _torchvision_state(3, num_classes=10)   # MS-Celeb identity classifier: fc is dropped
    path = _save(tmp_path, {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 30})
    model = _model()
    report = load_backbone_checkpoint(nn.DataParallel(model), path, printer=None)   # a wrapped model works too
    _assert_backbone_from(model, state)
    assert (report.container, report.prefix, report.dropped) == ("state_dict", "module.", ("fc.*",))


def test_module_prefix_in_container_with_bookkeeping(tmp_path, capsys):
    state = _torchvision_state(4)
    optimizer = torch.optim.SGD(ResNet18(10).parameters(), lr=0.1, momentum=0.9)
    path = _save(tmp_path, {
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "epoch": 3, "optimizer": optimizer.state_dict(), "arch": "resnet18",
        "best_acc": np.float64(0.71), "history": np.array([0.5, 0.71]),   # numpy bookkeeping: plain data
    })
    model = _model()
    report = load_backbone_checkpoint(model, path)   # the training loop's call: two arguments, prints
    _assert_backbone_from(model, state)
    assert (report.container, report.prefix) == ("state_dict", "module.")
    out = capsys.readouterr().out
    assert out == str(report) + "\n"
    assert "container 'state_dict'; prefix 'module.' stripped" in out


@pytest.mark.parametrize("container, prefix", [
    ("model", ""), ("net", "module."), ("model_state_dict", "module.backbone."), ("state_dict", "model."),
    ("model.state_dict", "net."), (None, "backbone."), (None, "module.module."),
])
def test_containers_and_wrapper_prefixes(tmp_path, container, prefix):
    state = _torchvision_state(5)
    saved: object = {f"{prefix}{k}": v for k, v in state.items()}
    for key in reversed(container.split(".") if container else []):
        saved = {key: saved, "epoch": 12, "best_acc": torch.tensor(0.5), "arch": "resnet18"}
    path = _save(tmp_path, saved)
    model = _model()
    report = load_backbone_checkpoint(model, path, printer=None)
    _assert_backbone_from(model, state)
    assert (report.container, report.prefix, report.backbone_tensors) == (container, prefix, TRUNK_TENSORS)


def test_trunk_saved_as_sequential(tmp_path):
    # nn.Sequential(*list(resnet18.children())[:-2]) saved on its own: keys 0.weight, 4.0.conv1.weight, ...
    source = ResNet18()
    _randomize(source, 6)
    trunk = nn.Sequential(*list(source.children())[:-2])
    path = _save(tmp_path, {"model": trunk.state_dict(), "epoch": 1})
    model = _model()
    report = load_backbone_checkpoint(model, path, printer=None)
    _assert_backbone_from(model, {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")})
    assert (report.layout, report.dropped) == ("sequential", ())


# ------------------------------------------------------------------------------------ DAN full model

class _DANSpatialAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1x1 = nn.Sequential(nn.Conv2d(512, 256, kernel_size=1), nn.BatchNorm2d(256))
        self.conv_3x3 = nn.Sequential(nn.Conv2d(256, 512, kernel_size=3, padding=1), nn.BatchNorm2d(512))
        self.conv_1x3 = nn.Sequential(nn.Conv2d(256, 512, kernel_size=(1, 3), padding=(0, 1)), nn.BatchNorm2d(512))
        self.conv_3x1 = nn.Sequential(nn.Conv2d(256, 512, kernel_size=(3, 1), padding=(1, 0)), nn.BatchNorm2d(512))
        self.relu = nn.ReLU()


class _DANChannelAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.attention = nn.Sequential(nn.Linear(512, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True),
                                       nn.Linear(32, 512), nn.Sigmoid())


class _DANHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.sa = _DANSpatialAttention()
        self.ca = _DANChannelAttention()


class _DAN(nn.Module):
    """yaoing/DAN's DAN module structure (no forward): the same names as its state dicts."""

    def __init__(self, num_class: int = 8, num_head: int = 4):
        super().__init__()
        resnet = ResNet18()   # torchvision layout, children in torchvision's order
        self.features = nn.Sequential(*list(resnet.children())[:-2])
        self.num_head = num_head
        for i in range(num_head):
            setattr(self, f"cat_head{i}", _DANHead())
        self.sig = nn.Sigmoid()
        self.fc = nn.Linear(512, num_class)
        self.bn = nn.BatchNorm1d(num_class)


def _dan_checkpoint(tmp_path, num_head: int = 4, seed: int = 7, drop_nbt: bool = False) -> tuple[_DAN, object]:
    dan = _randomize(_DAN(num_head=num_head), seed)
    state = {k: v for k, v in dan.state_dict().items() if not (drop_nbt and k.endswith(NBT))}
    # what DAN's rafdb.py / affectnet.py write
    optimizer = torch.optim.Adam(dan.parameters())
    path = _save(tmp_path, {"iter": 40, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict()},
                 f"dan_{num_head}heads.pth")
    return dan, path


def _assert_head_from_dan(model: HMHN, i: int, dan: _DAN) -> None:
    """HMHN head i against DAN's cat_head<i>, layer for layer (not through the loader's rename table)."""
    ours, theirs = model.mab.heads[i], getattr(dan, f"cat_head{i}")
    pairs = [(ours.spatial.reduce, theirs.sa.conv1x1), (ours.spatial.conv_3x3, theirs.sa.conv_3x3),
             (ours.spatial.conv_1x3, theirs.sa.conv_1x3), (ours.spatial.conv_3x1, theirs.sa.conv_3x1),
             (ours.channel.gate, theirs.ca.attention)]
    for mine, dans in pairs:
        _assert_equal(mine.state_dict(), dans.state_dict())


def _assert_trunk_from_dan(model: HMHN, dan: _DAN) -> None:
    trunk = model.backbone
    for mine, index in ((trunk.conv1, 0), (trunk.bn1, 1), (trunk.layer1, 4), (trunk.layer2, 5),
                        (trunk.layer3, 6), (trunk.layer4, 7)):
        _assert_equal(mine.state_dict(), dan.features[index].state_dict())


def test_dan_key_names_are_dans():
    keys = set(_DAN(num_head=4).state_dict())
    assert {"features.0.weight", "features.1.running_mean", "features.4.0.conv1.weight",
            "features.7.1.bn2.num_batches_tracked", "features.5.0.downsample.0.weight",
            "cat_head0.sa.conv1x1.0.weight", "cat_head0.sa.conv1x1.1.running_var", "cat_head3.sa.conv_1x3.0.bias",
            "cat_head2.ca.attention.0.weight", "cat_head2.ca.attention.1.num_batches_tracked",
            "cat_head1.ca.attention.3.bias", "fc.weight", "bn.running_mean"} <= keys


def test_load_dan_full_checkpoint_into_trunk_and_heads(tmp_path):
    dan, path = _dan_checkpoint(tmp_path)
    model = _model()
    before = _snapshot(model)
    report = load_backbone_checkpoint(model, path, printer=None)
    _assert_trunk_from_dan(model, dan)
    for i in range(4):
        _assert_head_from_dan(model, i, dan)
    for key, value in model.state_dict().items():   # GWA, DFF, regressor: untouched
        if not key.startswith(("backbone.", "mab.")):
            assert torch.equal(value, before[key]), key
    assert (report.layout, report.container, report.prefix) == ("dan", "model_state_dict", "")
    assert report.dropped == ("bn.*", "fc.*")
    assert (report.heads_loaded, report.heads_in_file, report.heads_total) == ((0, 1, 2, 3), (0, 1, 2, 3), 4)
    assert report.left_at_init == ("gwa.*", "dff.*", "regressor.*")
    assert str(report).endswith("MAB heads: 4/4 loaded from DAN cat_head0..3; left at init: gwa.*, dff.*, regressor.*")


def test_dan_under_dataparallel_without_num_batches_tracked(tmp_path):
    dan, _ = _dan_checkpoint(tmp_path, drop_nbt=True)
    state = {f"module.{k}": v for k, v in dan.state_dict().items() if not k.endswith(NBT)}
    path = _save(tmp_path, {"state_dict": state, "epoch": 9})
    model = _model()
    before = _snapshot(model)
    report = load_backbone_checkpoint(model, path, printer=None)
    assert (report.prefix, report.backbone_filled, report.heads_filled) == ("module.", TRUNK_NBT, 4 * HEAD_NBT)
    assert report.heads_loaded == (0, 1, 2, 3)
    for key, value in model.state_dict().items():
        if key.endswith(NBT):   # kept at the model's value; everything else came from the file
            assert torch.equal(value, before[key]), key
    trunk = model.backbone
    assert torch.equal(trunk.layer3[1].bn2.running_var, dan.features[6][1].bn2.running_var)
    assert torch.equal(model.mab.heads[2].channel.gate[1].running_mean, dan.cat_head2.ca.attention[1].running_mean)


def test_dan_with_more_heads_than_hmhn(tmp_path):
    dan, path = _dan_checkpoint(tmp_path, num_head=4)
    model = _model(num_heads=2)
    report = load_backbone_checkpoint(model, path, printer=None)
    _assert_trunk_from_dan(model, dan)
    _assert_head_from_dan(model, 0, dan)
    _assert_head_from_dan(model, 1, dan)
    assert (report.heads_loaded, report.heads_total) == ((0, 1), 2)
    assert "MAB heads: 2/2 loaded from DAN cat_head0, cat_head1 (cat_head2, cat_head3 unused: the model has 2 MAB " \
           "heads)" in str(report)


def test_dan_with_fewer_heads_than_hmhn(tmp_path):
    dan, path = _dan_checkpoint(tmp_path, num_head=2)
    model = _model(num_heads=4)
    before = _snapshot(model)
    report = load_backbone_checkpoint(model, path, printer=None)
    _assert_head_from_dan(model, 0, dan)
    _assert_head_from_dan(model, 1, dan)
    for key, value in model.state_dict().items():
        if key.startswith(("mab.heads.2.", "mab.heads.3.")):
            assert torch.equal(value, before[key]), key
    assert report.heads_loaded == (0, 1)
    assert report.left_at_init == ("gwa.*", "dff.*", "mab.heads.2.*", "mab.heads.3.*", "regressor.*")
    assert "cat_head2, cat_head3 not in the file" in str(report)


def test_dan_heads_that_do_not_fit_stay_at_init(tmp_path):
    dan, path = _dan_checkpoint(tmp_path)
    model = _model(head_reduction=128)   # spatial unit 512 -> 128 -> 512: DAN's 256 does not fit
    before = _snapshot(model)
    report = load_backbone_checkpoint(model, path, printer=None)
    _assert_trunk_from_dan(model, dan)   # the trunk still loads
    _assert_equal(_snapshot(model.mab), {k[len("mab."):]: v for k, v in before.items() if k.startswith("mab.")})
    assert report.heads_loaded == () and "mab.*" in report.left_at_init
    assert "cat_head0 does not fit head 0: shape mismatches: spatial.conv_1x3.0.weight" in str(report)


def test_dan_into_hmhn_without_mab(tmp_path):
    dan, path = _dan_checkpoint(tmp_path)
    model = _model(use_mab=False)
    report = load_backbone_checkpoint(model, path, printer=None)
    _assert_trunk_from_dan(model, dan)
    assert (report.heads_total, report.heads_loaded) == (0, ())
    assert "MAB heads: none in the model (use_mab=False; DAN cat_head0..3 unused)" in str(report)


# --------------------------------------------------------------------------------------- wrong files

def test_load_rejects_wrong_files(tmp_path):
    model = _model()
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError):
        load_backbone_checkpoint(model, tmp_path / "absent.pth")
    state = _torchvision_state(8)
    no_nbt = {k: v for k, v in state.items() if not k.endswith(NBT)}
    dan_state = _DAN(num_head=4).state_dict()
    cases = {
        "missing keys: layer4.1.bn2.bias": {k: v for k, v in state.items() if k != "layer4.1.bn2.bias"},
        # num_batches_tracked is optional, nothing else is: only the real gap is listed
        r"missing keys: layer2.0.conv1.weight \(": {k: v for k, v in no_nbt.items() if k != "layer2.0.conv1.weight"},
        "unexpected keys: layer1.2.conv1.weight": {**state, "layer1.2.conv1.weight": torch.zeros(64, 64, 3, 3)},
        "shape mismatches: conv1.weight": {**state, "conv1.weight": torch.zeros(64, 1, 7, 7)},
        # a whole-HMHN state dict is not a backbone checkpoint
        r"missing keys: .*the file's key groups, after unwrapping: gwa.\* \(\d+\), dff.\* \(\d+\), backbone.\*":
            _model().state_dict(),
        # "backbone." on only some keys is no wrapper: not stripped
        "unexpected keys: backbone.conv1.weight": {**{k: v for k, v in state.items() if k != "conv1.weight"},
                                                    "backbone.conv1.weight": state["conv1.weight"]},
        "missing keys: layer1.0.bn1.weight": {k: v for k, v in dan_state.items()
                                              if k != "features.4.0.bn1.weight"},
        "unexpected keys: features.8.weight": {**dan_state, "features.8.weight": torch.zeros(3)},
    }
    for message, bad_state in cases.items():
        path = _save(tmp_path, {"state_dict": bad_state, "epoch": 1}, "bad.pth")
        with pytest.raises(ValueError, match=message):
            load_backbone_checkpoint(model, path, printer=None)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable"):
        load_backbone_checkpoint(model, garbage)
    torch.save(ResNet18(), garbage)   # a whole pickled model: weights_only loading refuses to run its class
    with pytest.raises(ValueError, match="not a loadable.*pickles the Python object hmhn.blocks.resnet.ResNet18"):
        load_backbone_checkpoint(model, garbage)
    torch.save([1, 2, 3], garbage)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_backbone_checkpoint(model, garbage)
    torch.save({"epoch": 3, "weights": [state["conv1.weight"]]}, garbage)   # no container, no state dict
    with pytest.raises(ValueError, match="entry 'epoch' is not a named tensor .int.*top-level keys: epoch"):
        load_backbone_checkpoint(model, garbage)
    torch.save({"state_dict": {**state, "step": 3}}, garbage)   # the state dict itself must hold tensors
    with pytest.raises(ValueError, match="entry 'step' .in container 'state_dict'. is not a named tensor .int."):
        load_backbone_checkpoint(model, garbage)
    torch.save({"state_dict": {}, "epoch": 3}, garbage)
    with pytest.raises(ValueError, match="expected a state dict .in container 'state_dict'., got an empty"):
        load_backbone_checkpoint(model, garbage)
    _assert_equal(model.state_dict(), before)   # failed loads leave the whole model untouched
