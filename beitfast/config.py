"""Typed configuration: YAML files with `base:` inheritance, dotted CLI overrides.

A config file is a mapping of sections (``model``, ``data``, ...) to keys. It may name a
``base:`` file (a path relative to itself, or a bare name looked up under ``configs/``);
its keys override the base's, recursively. Command-line overrides such as
``optim.lr=1e-3`` or ``--optim.lr 1e-3`` are applied last. The merged mapping is then
checked against the dataclass sections below: an unknown key, a wrong type or a missing
file is a ``ConfigError`` naming the key and the file (or the command line) it came from.

The resolved config is resolved once, passed explicitly, and saved with every run.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CLI = "<command line>"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and its source."""


# --------------------------------------------------------------------------- sections
# Field groups the three trainers' sections share (pretraining, fine-tuning, segmentation):
# the same keys, types and meaning in each; a section that needs another default re-declares
# the field. What differs between the trainers stays in their own sections.
@dataclass
class EncoderFields:
    """The ViT encoder's shape (model.*)."""
    size: Literal["micro", "tiny", "small", "base", "large"] = "base"
    img_size: int = 224
    patch_size: int = 16
    drop_path: float = 0.1
    layer_scale_init: Optional[float] = None  # None: the size's default (0.1 base, 1e-5 large)
    abs_pos_emb: bool = False


@dataclass
class RunFields:
    """How a trainer runs on its device (train.*)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on Ampere+, fp16 on V100, fp32 on CPU
    self_check: bool = True  # check the fast paths against their twins on this device before step 1
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    stop_at: int = 0  # exit after the checkpoint at this step, as if the job were killed (resume tests; 0: off)


@dataclass
class LogFields:
    """Where a trainer writes and how often it reports (log.*)."""
    out_dir: str = "runs/default"
    every: int = 50  # steps between host syncs for metrics
    ckpt_every_minutes: float = 0.0  # also a checkpoint when this much wall time has passed (0: off; beitfast/preempt.py)
    progress: bool = True


@dataclass
class ModelConfig(EncoderFields):
    vocab_size: int = 8192
    rel_pos_bias: Literal["shared", "per_block", "none"] = "shared"
    attention: Literal["sdpa", "flex"] = "sdpa"
    kernels: Literal["auto", "apex", "triton", "torch"] = "auto"
    # tokens: predict the masked patches' visual tokens (BEiT); pixels: regress their pixels
    # (the model's normalised input, mean squared error), the paper's ablation
    target: Literal["tokens", "pixels"] = "tokens"


@dataclass
class DataConfig:
    root: str = "data/toy_imagenet"
    split: str = "train"
    backend: Literal["auto", "dali", "ffcv", "reference"] = "auto"  # auto: dali over a cache, reference for online targets
    cache: str = ""  # token cache directory written by data_prep/tokenize_imagenet.py
    # cache: targets from the token cache; online: the original recipe, images read from
    # data.root and tokenized on the training device every step
    targets: Literal["cache", "online"] = "cache"
    batch_size: int = 128  # per GPU
    num_threads: int = 0  # DALI / FFCV / Numba / torch threads per rank (0: the node's cores divided among its ranks)
    workers: int = -1  # Python worker processes per rank reading the cache (-1: the same share; 0: in-process)
    prefetch: int = 2  # batches the loader prepares ahead (DALI's queue depth, at least 2)
    hw_decoder_load: float = 0.65  # share of JPEGs the GPU decoder gives the hardware JPEG engine (A100/H100)
    views: int = 10  # K sampled views per image stored in the token cache
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Augmentation (REFERENCE.md section 1)
    color_jitter: float = 0.4
    hflip: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    tokenizer_img_size: int = 112
    max_side: int = 0  # re-encode stored JPEGs to this longest side (0: keep as is)


@dataclass
class TokenizerConfig:
    kind: Literal["dalle", "dvae"] = "dalle"
    path: str = ""
    batch_size: int = 256
    # fp32 as the reference runs DALL-E; bf16 flips the argmax on near ties (README, measured)
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class MaskConfig:
    mode: Literal["block", "random"] = "block"
    num_patches: int = 75  # masking budget (40% of 14x14)
    min_patches: int = 16
    max_patches: Optional[int] = None  # None: the budget
    min_aspect: float = 0.3
    max_aspect: Optional[float] = None  # None: 1 / min_aspect
    exact: bool = False  # top up / trim to exactly num_patches (BEiT v2)
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = 3.0
    fused: Literal["auto", "apex", "torch", "none"] = "auto"  # none: torch AdamW unfused, as the reference


@dataclass
class TrainConfig(RunFields):
    epochs: int = 800
    global_batch: int = 2048
    compile: bool = False
    max_steps: int = 0  # stop after this many steps (0: run all epochs)
    allow_world_change: bool = False  # resume a checkpoint of another world size (per-rank RNG streams reseeded)
    sync_each_step: bool = False  # read the loss on the host every step, as the reference does (benchmarks)
    find_unused_parameters: bool = False  # DDP's flag; the reference sets it (benchmarks)


@dataclass
class LogConfig(LogFields):
    ckpt_every_epochs: int = 20
    tensorboard: bool = False  # also write TensorBoard event files next to metrics.jsonl
    profile_steps: int = 0  # >0: profile this many steps (after 3 warm-up steps) into <out>/profile/
    mim_eval: str = ""  # name:DIR,... token caches scored on fixed views into <out>/mim_eval.jsonl (beitfast/mim_eval.py)
    mim_eval_every_epochs: int = 1
    mim_eval_images: int = 256


class Sections:
    """Mixin for a root config of sections: dict view and atomic YAML dump."""

    def to_dict(self) -> dict:
        return asdict(self)

    def dump(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False))
        os.replace(tmp, path)


@dataclass
class Config(Sections):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        validate(self)


def _plain(obj):
    """Tuples -> lists so that yaml.safe_dump writes plain YAML."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- dVAE
@dataclass
class DVAEModelConfig:
    vocab_size: int = 8192
    n_hid: int = 256
    n_init: int = 128
    n_blk_per_group: int = 2
    downsample: int = 8
    likelihood: Literal["logit_laplace", "mse"] = "logit_laplace"
    img_size: int = 112


@dataclass
class DVAEDataConfig:
    root: str = "data/imagenet"
    split: str = "train"
    val_split: str = "val"
    batch_size: int = 64  # per process
    workers: int = 4
    crop_scale: tuple[float, float] = (0.35, 1.0)
    preload_side: int = 0  # >0: decode every image once into RAM at this shorter side
    eval_images: int = 64


@dataclass
class DVAEOptimConfig:
    lr: float = 1e-4
    min_lr: float = 1.25e-6
    warmup_steps: int = 500
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = None
    ema: float = 0.999  # 0: no EMA; else eval and export use the EMA weights


@dataclass
class DVAETrainConfig:
    steps: int = 100_000
    temp_start: float = 1.0
    temp_end: float = 0.0625  # 1/16
    anneal_steps: int = 0  # cosine temperature anneal length (0: all steps)
    kl_max: float = 6.6
    kl_warmup_steps: int = 5000
    seed: int = 0
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"


@dataclass
class DVAELogConfig:
    out_dir: str = "runs/dvae"
    every: int = 50
    eval_every: int = 1000
    ckpt_every: int = 1000
    progress: bool = True


@dataclass
class DVAEConfig(Sections):
    """Root config of data_prep/train_dvae.py."""

    model: DVAEModelConfig = field(default_factory=DVAEModelConfig)
    data: DVAEDataConfig = field(default_factory=DVAEDataConfig)
    optim: DVAEOptimConfig = field(default_factory=DVAEOptimConfig)
    train: DVAETrainConfig = field(default_factory=DVAETrainConfig)
    log: DVAELogConfig = field(default_factory=DVAELogConfig)

    def validate(self) -> None:
        m = self.model
        if m.img_size % m.downsample:
            raise ConfigError(f"model.img_size ({m.img_size}) must be a multiple of model.downsample ({m.downsample})")
        if m.downsample & (m.downsample - 1):
            raise ConfigError(f"model.downsample must be a power of two, got {m.downsample}")
        if self.train.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.train.steps}")


# --------------------------------------------------------------------------- fine-tuning
@dataclass
class FTModelConfig(EncoderFields):
    # a pretraining checkpoint of ours, the reference's (same key names), timm weights
    # (.pth / .safetensors), or "" for a randomly initialised encoder
    pretrained: str = ""
    num_classes: int = 0  # 0: the number of class folders under data.root/<train_split>


@dataclass
class FTDataConfig:
    root: str = "data/imagenet"
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 128  # per GPU
    workers: int = 8  # DataLoader processes per rank (0: in-process)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # timm's transforms (REFERENCE.md section 5)
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # "" turns RandAugment off
    reprob: float = 0.25
    remode: str = "pixel"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, centre crop (1.0 at 384 px)
    mixup: float = 0.8  # alpha (0: off)
    cutmix: float = 1.0  # alpha (0: off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1


@dataclass
class FTOptimConfig:
    lr: float = 4e-3  # at train.global_batch
    min_lr: float = 1e-6
    warmup_epochs: float = 20.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: Optional[float] = None


@dataclass
class FTTrainConfig(RunFields):
    epochs: int = 100
    global_batch: int = 1024
    eval_every_epochs: int = 1


@dataclass
class FTLogConfig(LogFields):
    out_dir: str = "runs/finetune"
    ckpt_every_epochs: int = 1


@dataclass
class FinetuneConfig(Sections):
    """Root config of beitfast/finetune.py."""

    model: FTModelConfig = field(default_factory=FTModelConfig)
    data: FTDataConfig = field(default_factory=FTDataConfig)
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)
    log: FTLogConfig = field(default_factory=FTLogConfig)

    def validate(self) -> None:
        m, t = self.model, self.train
        if m.img_size % m.patch_size:
            raise ConfigError(f"model.img_size ({m.img_size}) must be a multiple of model.patch_size ({m.patch_size})")
        if not 0 < self.optim.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.optim.layer_decay}")
        if t.global_batch % self.data.batch_size:
            raise ConfigError(f"train.global_batch ({t.global_batch}) must be a multiple of data.batch_size "
                              f"({self.data.batch_size})")
        if (self.data.mixup > 0 or self.data.cutmix > 0) and self.data.batch_size % 2:
            raise ConfigError(f"mixup/cutmix mix a batch with its reverse: data.batch_size must be even, "
                              f"got {self.data.batch_size}")
        if not 0 < self.data.crop_pct <= 1:
            raise ConfigError(f"data.crop_pct must be in (0, 1], got {self.data.crop_pct}")


# --------------------------------------------------------------------------- segmentation
@dataclass
class SegModelConfig(EncoderFields):
    img_size: int = 512  # the crop the model is built for (rel-pos tables interpolated to it)
    pretrained: str = ""  # as finetune's model.pretrained; "" = random init
    head: Literal["upernet", "setr_pup"] = "upernet"
    channels: int = 768  # decode head width (UperNet 768 in the reference's BEiT-B config; PUP 256)
    out_indices: tuple[int, int, int, int] = (3, 5, 7, 11)  # blocks 4, 6, 8, 12 (base)
    aux_weight: float = 0.4  # FCN auxiliary head on the third feature map (0: none)


@dataclass
class SegDataConfig:
    root: str = "data/ade20k"  # ADEChallengeData2016 layout: images/ and annotations/{training,validation}
    train_split: str = "training"
    val_split: str = "validation"
    num_classes: int = 150
    reduce_zero_label: bool = True  # label 0 (unlabelled) -> ignored, k -> k - 1
    img_scale: tuple[int, int] = (2048, 512)  # (long, short) bound of the resize, before the ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    batch_size: int = 2  # per GPU
    workers: int = 4
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class SegOptimConfig:
    lr: float = 7e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0  # poly decay
    min_lr: float = 0.0


@dataclass
class SegTrainConfig(RunFields):  # train.stop_at counts iterations
    iters: int = 160_000
    global_batch: int = 16
    eval_every: int = 16_000
    stride: int = 341  # slide inference: window = model.img_size, this stride


@dataclass
class SegLogConfig(LogFields):
    out_dir: str = "runs/seg"
    ckpt_every: int = 4000


@dataclass
class SegConfig(Sections):
    """Root config of beitfast/segment.py."""

    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    log: SegLogConfig = field(default_factory=SegLogConfig)

    def validate(self) -> None:
        m = self.model
        if m.img_size % (2 * m.patch_size):
            raise ConfigError(f"model.img_size ({m.img_size}) must be a multiple of 2 x model.patch_size "
                              f"({2 * m.patch_size}): the last feature map is pooled to stride 2 x patch")
        if m.head == "setr_pup" and m.patch_size & (m.patch_size - 1):
            raise ConfigError(f"model.head=setr_pup upsamples by 2 per stage back to stride 1: model.patch_size must be "
                              f"a power of 2, got {m.patch_size}")
        from beitfast.model import SIZES

        depth = SIZES[m.size][1]
        bad = [i for i in m.out_indices if not 0 <= i < depth]
        if bad or list(m.out_indices) != sorted(m.out_indices):
            raise ConfigError(f"model.out_indices must be increasing block indices in 0..{depth - 1}, got {m.out_indices}")
        if not 0 < self.train.stride <= m.img_size:
            raise ConfigError(f"train.stride must be in 1..model.img_size ({m.img_size}), got {self.train.stride}")
        if self.train.global_batch % self.data.batch_size:
            raise ConfigError(f"train.global_batch ({self.train.global_batch}) must be a multiple of data.batch_size "
                              f"({self.data.batch_size})")


# --------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` (no dot) as a float, as people write it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"""),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def find_config(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """Resolve a config name: an existing path, a path relative to `relative_to`, or a
    bare name (with or without .yaml) under configs/."""
    p = Path(name)
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to / p)
    if not p.is_absolute():
        candidates.append(CONFIG_DIR / p)
        if p.suffix == "":
            candidates.append(CONFIG_DIR / p.with_suffix(".yaml"))
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"config file not found: {name} (looked at {tried})")


def _load_tree(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """Load a file and its bases. Returns (merged mapping, provenance) where provenance
    maps a dotted key to the file that set it last."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise ConfigError(f"config base cycle: {cycle}")
    data = _read_yaml(path)
    base_name = data.pop("base", None)
    if base_name is not None:
        if not isinstance(base_name, str):
            raise ConfigError(f"{path}: key 'base' must be a file name, got {base_name!r}")
        merged, prov = _load_tree(find_config(base_name, path.parent), chain + (path,))
    else:
        merged, prov = {}, {}
    _merge(merged, data, prov, str(path), prefix="")
    return merged, prov


def _merge(dst: dict, src: dict, prov: dict, source: str, prefix: str) -> None:
    for k, v in src.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, prov, source, key + ".")
        else:
            dst[k] = v
            prov[key] = source
            if isinstance(v, dict):
                for sub in _dotted_keys(v, key + "."):
                    prov[sub] = source


def _dotted_keys(d: dict, prefix: str):
    for k, v in d.items():
        yield prefix + str(k)
        if isinstance(v, dict):
            yield from _dotted_keys(v, prefix + str(k) + ".")


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`a.b=1`, `--a.b=1` and `--a.b 1` -> [("a.b", 1)]; values are parsed as YAML."""
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            a = a[2:]
            if "=" not in a:
                if i + 1 >= len(args):
                    raise ConfigError(f"{CLI}: override --{a} has no value")
                a = f"{a}={args[i + 1]}"
                i += 1
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"{CLI}: cannot read override {args[i]!r}; expected section.key=value")
        key, raw = a.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_Loader) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
        i += 1
    return out


# --------------------------------------------------------------------------- typing
def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; convert where lossless (int -> float,
    list -> tuple). Raise ConfigError naming the key and its source otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str):
        return ConfigError(f"{source}: key '{key}' must be {expected}, got {value!r} ({type(value).__name__})")

    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is Literal:
        if value not in args:
            raise bad("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {key}")  # a bug here, not user input


def _build(cls, data: dict, prov: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        source = prov.get(key, CLI)
        if k not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key '{key}' (known keys here: {known})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a section (a mapping), got {v!r}")
            kwargs[k] = _build(tp, v, prov, key + ".")
        else:
            kwargs[k] = _coerce(v, tp, key, source)
    return cls(**kwargs)


def load_config(name: str | os.PathLike | None = None, overrides: list[str] | None = None, schema=None):
    """Resolve a config: file (with its bases), then CLI overrides, then type checks against
    `schema` (a dataclass of sections; default `Config`, the pretraining config)."""
    schema = Config if schema is None else schema
    if name is not None:
        merged, prov = _load_tree(find_config(name))
    else:
        merged, prov = {}, {}
    for key, value in parse_overrides(list(overrides or [])):
        parts = key.split(".")
        node = merged
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
        prov[key] = CLI
        if isinstance(value, dict):
            for sub in _dotted_keys(value, key + "."):
                prov[sub] = CLI
    cfg = _build(schema, merged, prov, "")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks of the pretraining config that types alone cannot express."""
    m, d = cfg.model, cfg.data
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size ({m.img_size}) must be a multiple of model.patch_size ({m.patch_size})")
    grid = m.img_size // m.patch_size
    if not 0 < cfg.mask.num_patches <= grid * grid:
        raise ConfigError(f"mask.num_patches ({cfg.mask.num_patches}) must be in 1..{grid * grid} for a {grid}x{grid} grid")
    if not 0 <= d.hw_decoder_load <= 1:
        raise ConfigError(f"data.hw_decoder_load must be in [0, 1], got {d.hw_decoder_load}")
    if d.views < 1:
        raise ConfigError(f"data.views must be >= 1, got {d.views}")
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {d.crop_scale}")


def cli_config(argv: list[str] | None = None, default: str | None = None, schema=None):
    """Parse `--cfg NAME` plus overrides from argv (a trainer's command line)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    name = default
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--cfg", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{CLI}: --cfg needs a file name")
            name = argv[i + 1]
            i += 2
            continue
        if argv[i].startswith(("--cfg=", "--config=")):
            name = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return load_config(name, rest, schema)
