"""Load a pretrained ResNet-18 (and DAN's attention heads) into HMHN from a local file (never downloads).

Files are read with torch.load(weights_only=True), so no code is unpickled (numpy scalars and arrays in
the bookkeeping, e.g. a `best_acc` saved as np.float64, are allowed as plain data). Accepted, as people
have them:

- a torchvision-layout ResNet-18 state dict (conv1.weight, bn1.*, layer1.0.conv1.weight, ..., fc.*),
  e.g. torchvision's own weights or DAN's MS-Celeb-1M `resnet18_msceleb.pth`;
- inside a container, possibly nested: {"state_dict" | "model_state_dict" | "model" | "net": {...}},
  with bookkeeping beside it (epoch, optimizer state, best_acc, arch, ...). The state dict itself
  must hold only tensors;
- with wrapper prefixes carried by every key, stripped repeatedly: "module." (DataParallel / DDP),
  "model.", "backbone.", "net." (e.g. "module.backbone.conv1.weight"). A prefix carried by only
  some keys is not stripped: such a file holds more than a ResNet-18 and is rejected;
- without `num_batches_tracked` buffers (saved by PyTorch < 0.4.1): PyTorch's own strict load
  accepts these, so they are optional here too and keep the model's current value;
- DAN's full model (yaoing/DAN networks/dan.py, e.g. {"model_state_dict": ...} from its training
  scripts): the trunk `features.N.*` (nn.Sequential of resnet18's children: 0 conv1, 1 bn1,
  4 layer1 ... 7 layer4) and the heads `cat_head<i>.{sa,ca}.*`, which go into HMHN's MAB heads
  (same layers: sa.conv1x1 -> spatial.reduce, sa.conv_3x3/1x3/3x1 -> spatial.*, ca.attention ->
  channel.gate) when they fit; heads that do not fit, or that HMHN lacks, keep their initial values.

The trunk is loaded strictly: apart from the classifier (fc.*, and DAN's bn.* on the logits), which is
dropped, and num_batches_tracked, every key must be present in the file, nothing else may be in it, and
every shape must match; otherwise a ValueError lists what does not fit and the model is left untouched.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Containers seen around state dicts in published checkpoints, in the order they are looked for.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_MAX_CONTAINER_DEPTH = 4
# Prefixes that wrappers put before every key (DataParallel/DDP, Lightning-style modules, backbone holders).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "net.")
_OPTIONAL_SUFFIX = "num_batches_tracked"
# resnet18's children kept by DAN's `nn.Sequential(*list(resnet.children())[:-2])` (2 relu, 3 maxpool: no state).
_SEQUENTIAL_TRUNK = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_DAN_HEAD = re.compile(r"cat_head(\d+)\.(.+)")
_DAN_HEAD_RENAMES = (("sa.conv1x1.", "spatial.reduce."), ("sa.conv_3x3.", "spatial.conv_3x3."),
                     ("sa.conv_1x3.", "spatial.conv_1x3."), ("sa.conv_3x1.", "spatial.conv_3x1."),
                     ("ca.attention.", "channel.gate."))
_MAX_LISTED = 8

Printer = Callable[[str], Any]


@dataclass(frozen=True)
class LoadReport:
    """What load_backbone_checkpoint took from a file and what it left at the model's initial values.

    str(report) (= report.summary()) is the line that load_backbone_checkpoint prints.
    """

    path: str
    layout: str                          # "torchvision", "dan" (features.N + cat_head<i>) or "sequential" (N.*)
    container: str | None                # where the state dict sat, e.g. "state_dict" or "model.state_dict"; None: none
    prefix: str                          # wrapper prefix stripped from every key, e.g. "module."; "" for none
    backbone_tensors: int                # trunk tensors taken from the file
    backbone_filled: int                 # trunk num_batches_tracked buffers absent from the file (model value kept)
    dropped: tuple[str, ...]             # key groups in the file deliberately not loaded, e.g. ("fc.*",)
    heads_total: int                     # MAB heads HMHN has (0 when use_mab=False)
    heads_loaded: tuple[int, ...]        # HMHN head i loaded from the file's cat_head<i>
    heads_in_file: tuple[int, ...]       # DAN head indices present in the file
    heads_filled: int                    # head num_batches_tracked buffers absent from the file (model value kept)
    head_notes: tuple[str, ...]          # why a head was not loaded / a file head not used
    left_at_init: tuple[str, ...] = field(default=())  # HMHN parts holding state that kept their initial values

    def summary(self) -> str:
        details = [f"layout {self.layout}"]
        if self.container:
            details.append(f"container {self.container!r}")
        if self.prefix:
            details.append(f"prefix {self.prefix!r} stripped")
        if self.backbone_filled:
            details.append(f"{self.backbone_filled} num_batches_tracked missing, kept at the model's value")
        if self.dropped:
            details.append("dropped " + ", ".join(self.dropped))
        parts = [f"backbone: {self.backbone_tensors} tensors loaded from {self.path} ({'; '.join(details)})"]
        notes = list(self.head_notes)
        if self.heads_total:
            heads = f"MAB heads: {len(self.heads_loaded)}/{self.heads_total} loaded"
            if self.heads_loaded:
                heads += f" from DAN {_head_names(self.heads_loaded)}"
        else:
            heads = "MAB heads: none in the model"
            notes.insert(0, "use_mab=False")
        if self.heads_filled:
            notes.append(f"{self.heads_filled} num_batches_tracked missing, kept at the model's value")
        if notes:
            heads += f" ({'; '.join(notes)})"
        parts.append(heads)
        parts.append("left at init: " + (", ".join(self.left_at_init) if self.left_at_init else "nothing"))
        return "; ".join(parts)

    __str__ = summary


@dataclass
class _Contents:
    """A checkpoint file's tensors, renamed to HMHN's names and sorted into trunk, heads and dropped keys."""

    layout: str
    container: str | None
    prefix: str
    trunk: dict[str, torch.Tensor]
    heads: dict[int, dict[str, torch.Tensor]]
    dropped: tuple[str, ...]


# ------------------------------------------------------------------------------------------ reading

def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals: all mean "not a state dict"
        first = exc
    numpy_globals = _numpy_data_globals()
    if numpy_globals and "numpy" in str(first):
        try:  # bookkeeping saved as numpy scalars/arrays (best_acc = np.float64(...)): plain data, allow it
            with torch.serialization.safe_globals(numpy_globals):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = exc
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(first))
    if refused:   # e.g. torch.save(model): a pickled module, which weights_only loading will not run
        raise ValueError(f"{path}: not a loadable PyTorch state dict: it pickles the Python object {refused.group(1)} "
                         f"(a whole model saved with torch.save(model)?); save model.state_dict() instead") from first
    raise ValueError(f"{path}: not a loadable PyTorch state dict ({type(first).__name__}: "
                     f"{_first_line(str(first))})") from first


def _numpy_data_globals() -> list[Any]:
    try:
        import numpy as np
    except ImportError:
        return []
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    codes = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"   # no object dtype
    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype,
            *{type(np.dtype(code)) for code in codes}]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else "")[:300]


def _is_state_dict(node: Any) -> bool:
    return isinstance(node, Mapping) and bool(node) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in node.items())


def _unwrap_container(raw: Any, path: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    node, trail = raw, []
    while isinstance(node, Mapping) and not _is_state_dict(node) and len(trail) < _MAX_CONTAINER_DEPTH:
        key = next((k for k in _CONTAINER_KEYS if isinstance(node.get(k), Mapping)), None)
        if key is None:
            break
        node = node[key]
        trail.append(key)
    container = ".".join(trail) or None
    where = f" (in container {container!r})" if container else ""
    if not isinstance(node, Mapping):
        raise ValueError(f"{path}: expected a state dict (or a dict with one of "
                         f"{', '.join(repr(k) for k in _CONTAINER_KEYS)}), got {type(node).__name__}")
    if not node:
        raise ValueError(f"{path}: expected a state dict{where}, got an empty {type(node).__name__}")
    for key, value in node.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            hint = "" if trail else (f"; no container {', '.join(repr(k) for k in _CONTAINER_KEYS)} "
                                     f"holding a state dict found beside it (top-level keys: {_listing(list(node))})")
            raise ValueError(f"{path}: entry {key!r}{where} is not a named tensor ({type(value).__name__}); "
                             f"this is not a model state dict{hint}")
    return node, container


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Strip wrapper prefixes that every key carries ("module.", then e.g. "backbone."), repeatedly.

    Trunk and DAN names never start with a wrapper name, so a prefix on every key can only be a wrapper's;
    one on some keys only means the file holds more than the model we load, and stays (the keys then fail).
    """
    state, stripped = dict(state), ""
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) and len(k) > len(p) for k in state)), None)
        if prefix is None:
            return state, stripped
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped += prefix


def _rename_sequential(key: str) -> str:
    """'4.0.conv1.weight' -> 'layer1.0.conv1.weight' (an unknown index stays as it is, and fails later)."""
    index, _, rest = key.partition(".")
    return f"{_SEQUENTIAL_TRUNK[index]}.{rest}" if index in _SEQUENTIAL_TRUNK and rest else key


def _sort_keys(state: dict[str, torch.Tensor]) -> tuple[str, dict, dict, tuple[str, ...]]:
    if any(k.startswith("features.") for k in state):
        layout = "dan"
    elif all(k.split(".", 1)[0].isdigit() for k in state):
        layout = "sequential"
    else:
        layout = "torchvision"
    dropped_groups = ("fc", "bn") if layout == "dan" else ("fc",)
    trunk: dict[str, torch.Tensor] = {}
    heads: dict[int, dict[str, torch.Tensor]] = {}
    dropped: set[str] = set()
    for key, value in state.items():
        head = _DAN_HEAD.fullmatch(key)
        group = key.split(".", 1)[0]
        if head:
            name = head.group(2)
            for dan, ours in _DAN_HEAD_RENAMES:
                if name.startswith(dan):
                    name = ours + name[len(dan):]
                    break
            heads.setdefault(int(head.group(1)), {})[name] = value
        elif group in dropped_groups and "." in key:
            dropped.add(f"{group}.*")
        elif layout == "dan" and group == "features" and (key.split(".") + [""])[1] in _SEQUENTIAL_TRUNK:
            trunk[_rename_sequential(key.split(".", 1)[1])] = value
        elif layout == "sequential":
            trunk[_rename_sequential(key)] = value
        else:
            trunk[key] = value
    return layout, trunk, heads, tuple(sorted(dropped))


def _read_contents(path: str | os.PathLike) -> _Contents:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    state, container = _unwrap_container(_torch_load(path), path)
    state, prefix = _strip_wrappers(state)
    layout, trunk, heads, dropped = _sort_keys(state)
    return _Contents(layout, container, prefix, trunk, heads, dropped)


def read_backbone_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trunk's tensors from a checkpoint file, in torchvision names: container unwrapped, wrapper
    prefixes stripped, DAN's features.N renamed, classifier and DAN heads left out.

    num_batches_tracked may be absent (old PyTorch); load_backbone_state_dict accepts that.
    """
    return _read_contents(path).trunk


# ------------------------------------------------------------------------------------------ fitting

def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _fit(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> tuple[dict, int, list[str]]:
    """(complete state for a strict load, num_batches_tracked filled, problems); problems empty when it fits."""
    missing = sorted(set(expected) - set(state))
    optional = [k for k in missing if k.rsplit(".", 1)[-1] == _OPTIONAL_SUFFIX]
    missing = [k for k in missing if k not in optional]
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    complete = {**state, **{k: expected[k].detach().clone() for k in optional}}
    return complete, len(optional), problems


def _key_groups(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for key in keys:
        group = key.split(".", 1)[0] + ".*"
        counts[group] = counts.get(group, 0) + 1
    return _listing([f"{group} ({n})" for group, n in counts.items()])


def load_backbone_state_dict(backbone: nn.Module, state: Mapping[str, torch.Tensor],
                             source: str = "state dict") -> int:
    """Strict load, except that absent num_batches_tracked buffers keep the model's value (as in PyTorch's
    own strict load of pre-0.4.1 files). Returns how many were absent.

    ValueError listing missing / unexpected keys and shape mismatches when the state does not fit;
    the backbone is then left untouched.
    """
    complete, filled, problems = _fit(backbone.state_dict(), state)
    if problems:
        raise ValueError(f"{source} does not fit the ResNet-18 trunk; " + "; ".join(problems)
                         + f" (the file's key groups: {_key_groups(list(state))})")
    backbone.load_state_dict(complete, strict=True)
    return filled


def _head_names(indices: tuple[int, ...] | list[int]) -> str:
    indices = sorted(indices)
    if len(indices) > 2 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"cat_head{indices[0]}..{indices[-1]}"
    return ", ".join(f"cat_head{i}" for i in indices)


def load_backbone_checkpoint(model: nn.Module, path: str | os.PathLike,
                             printer: Printer | None = print) -> LoadReport:
    """Load a ResNet-18 checkpoint strictly into `model.backbone` (and DAN's heads into `model.mab` where
    they fit); see the module docstring for the files accepted.

    Returns a LoadReport and passes its one-line summary to `printer` (None: silent).
    FileNotFoundError for a missing file; ValueError for a file whose trunk does not fit ResNet-18, in
    which case nothing in the model is changed.
    """
    if not hasattr(model, "backbone") and hasattr(model, "module"):   # DataParallel / DDP wrapper
        model = model.module
    contents = _read_contents(path)
    # Everything is checked before anything is loaded: a file that does not fit changes nothing.
    trunk, backbone_filled, problems = _fit(model.backbone.state_dict(), contents.trunk)
    if problems:
        raise ValueError(f"{path} does not fit the ResNet-18 trunk; " + "; ".join(problems)
                         + f" (the file's key groups, after unwrapping: {_key_groups(list(contents.trunk))})")

    model_heads = list(model.mab.heads) if getattr(model, "mab", None) is not None else []
    head_states: dict[int, dict[str, torch.Tensor]] = {}
    heads_filled = 0
    notes: list[str] = []
    if model_heads and not contents.heads:
        notes.append("no DAN heads in the file")
    absent = [i for i in range(len(model_heads)) if i not in contents.heads]
    if contents.heads and absent:
        notes.append(f"{_head_names(absent)} not in the file")
    for i, head in enumerate(model_heads):
        if i not in contents.heads:
            continue
        complete, filled, head_problems = _fit(head.state_dict(), contents.heads[i])
        if head_problems:
            notes.append(f"cat_head{i} does not fit head {i}: " + "; ".join(head_problems))
        else:
            head_states[i] = complete
            heads_filled += filled
    unused = sorted(i for i in contents.heads if i >= len(model_heads))
    if unused:
        notes.append(f"{_head_names(unused)} unused: the model has {len(model_heads)} MAB heads" if model_heads
                     else f"DAN {_head_names(unused)} unused")

    model.backbone.load_state_dict(trunk, strict=True)
    for i, state in head_states.items():
        model_heads[i].load_state_dict(state, strict=True)

    left: list[str] = []
    for name, child in model.named_children():
        if name == "backbone" or not child.state_dict():
            continue
        if name == "mab" and head_states:
            left += [f"mab.heads.{i}.*" for i in range(len(model_heads)) if i not in head_states]
        else:
            left.append(f"{name}.*")
    report = LoadReport(
        path=str(path), layout=contents.layout, container=contents.container, prefix=contents.prefix,
        backbone_tensors=len(contents.trunk), backbone_filled=backbone_filled, dropped=contents.dropped,
        heads_total=len(model_heads), heads_loaded=tuple(sorted(head_states)),
        heads_in_file=tuple(sorted(contents.heads)), heads_filled=heads_filled, head_notes=tuple(notes),
        left_at_init=tuple(left))
    if printer is not None:
        printer(str(report))
    return report
