"""LoRA files: the two layouts SD 1.x LoRAs are shared in, read into minildm's modules (the
updates of minildm/lora.py) and written back.

Each adapted layer holds two matrices, A (down, r x in) and B (up, out x r), and its update is
(alpha / r) B A (Hu et al. 2021, arXiv:2106.09685, section 4.1). The files name the layer as the
reference implementation does, and differ in how:

- diffusers / PEFT (diffusers `loaders/lora_pipeline.py`, StableDiffusionLoraLoaderMixin, whose
  `save_lora_weights` writes `pytorch_lora_weights.safetensors`):

      unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   A (r, in)
      unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   B (out, r)
      text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight

  A 1x1 convolution (proj_in, proj_out) holds (r, in, 1, 1) and (out, r, 1, 1). alpha is not a
  tensor: PEFT's LoraConfig (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`) travels as JSON
  in the safetensors header under "lora_adapter_metadata", its keys prefixed by the component
  ("unet.lora_alpha"); a file without it means alpha = r. The 2023 spellings of the same tensors
  are read too: `attn1.processor.to_q_lora.down.weight` (attention processors),
  `attn1.to_q.lora.down.weight` and `self_attn.q_proj.lora_linear_layer.down.weight`.
- kohya-ss (sd-scripts `networks/lora.py`, LoRANetwork; most LoRAs shared for SD 1.x, and what
  AUTOMATIC1111's web UI reads): the layer's diffusers or transformers name, dots made
  underscores, after `lora_unet_` or `lora_te_`:

      lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  A
      lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    B
      lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha   alpha ()
      lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight

  kohya adapts every linear layer and 1x1 convolution inside the UNet's transformers (proj_in,
  attn1 and attn2's to_q/k/v/out.0, ff.net.0.proj, ff.net.2, proj_out) and the text encoder's
  attention and MLP (q/k/v/out_proj, fc1, fc2). Its header records the rank (`ss_network_dim`)
  and alpha it trained with; a missing alpha, or 0, means alpha = r (LoRAModule.__init__).

Where the readers differ (tests/test_lora_files.py holds minildm to diffusers 0.42.1 elsewhere):
- a kohya alpha of 0 is alpha = r to sd-scripts and to minildm; diffusers takes it for 0, which
  switches the LoRA off (its `get_peft_kwargs` passes the value on as PEFT's lora_alpha);
- diffusers' model-level `UNet2DConditionModel.load_lora_adapter(path)` reads a .safetensors
  file without its header unless given `use_safetensors=True`, and so loses the alpha the header
  holds (alpha = r); the pipeline's `load_lora_weights` sets it.

Names are matched by rules, not tables: {the file's name of a layer: ours} is built from the
model's own modules through its key map (checkpoints/unet.py `diffusers_name`, checkpoints/clip.py
`transformers_name`), so every layer a LoRA can adapt (`minildm.lora.adaptable`) is found.

Reading is strict, and every check runs before a module changes: every key is used; each layer
has its down and up, of one rank, the rank the header declares; alpha is a non-negative scalar;
the shapes are the layer's. Files made for other models are named: SDXL, SD 2.x, LoCon and other
LyCORIS kinds, DoRA.
"""

import collections
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minildm.checkpoints.clip import transformers_name
from minildm.checkpoints.unet import diffusers_name
from minildm.checkpoints.weights import CheckpointError, read_state_dict
from minildm.lora import adaptable, add_lora, lora_layers

COMPONENTS = ("unet", "text_encoder")
LAYOUTS = ("diffusers", "kohya")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


@dataclass
class LayerWeights:
    """One layer's update as a file stores it."""

    name: str  # the layer's name in the file, as messages show it
    down: torch.Tensor  # A: (r, in), or (r, in, 1, 1) for a 1x1 convolution
    up: torch.Tensor  # B: (out, r), or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoRAFile:
    """A LoRA file, read and checked on its own (`read_lora`); `apply_lora` checks it against the
    models. `layers` is keyed by (component, the layer's name in the file without its prefix)."""

    path: Path
    layout: str  # "diffusers" or "kohya"
    layers: dict  # {("unet" or "text_encoder", name): LayerWeights}


# --- Reading a file ---------------------------------------------------------------------------


def read_lora(path) -> LoRAFile:
    """Read a LoRA file (.safetensors, or a .bin/.pt pickle read with weights_only=True) in either
    layout and check it on its own: every key known, pairs complete, ranks and alphas sound."""
    path = Path(path)
    tensors = read_state_dict(path)  # a damaged file is a CheckpointError naming it
    header = _safetensors_header(path)
    _refuse_other_models(path, tensors, header)
    if any(key.startswith(tuple(KOHYA_PREFIX.values())) for key in tensors):
        layout, parts, unknown = "kohya", *_kohya_parts(tensors)
    else:
        layout, parts, unknown = "diffusers", *_diffusers_parts(tensors)
    if unknown:
        raise _unknown_keys_error(path, unknown)
    if not parts:
        raise CheckpointError(f"{path} holds no LoRA tensors (it is empty)")
    config = _peft_config(path, header) if layout == "diffusers" else {}
    layers = {}
    for (component, name), found in parts.items():
        shown = KOHYA_PREFIX[component] + name if layout == "kohya" else f"{component}.{name}"
        down, up = _down_and_up(path, shown, found)
        if layout == "kohya":
            declared_rank = _kohya_declared_rank(header)
            alpha = _kohya_alpha(path, shown, found.get("alpha"), down.shape[0])
        else:
            declared_rank, alpha = _peft_rank_and_alpha(path, shown, config.get(component), name)
            alpha = _diffusers_alpha(path, shown, found.get("alpha"), alpha, down.shape[0])
        if declared_rank is not None and declared_rank != down.shape[0]:
            raise CheckpointError(
                f"{path}: {shown} has rank {down.shape[0]} (A {tuple(down.shape)}, B "
                f"{tuple(up.shape)}), but the file declares rank {declared_rank} "
                f"({'ss_network_dim' if layout == 'kohya' else 'r in lora_adapter_metadata'}): "
                "the file contradicts itself (edited or damaged); ask its author for a fixed copy"
            )
        layers[component, name] = LayerWeights(shown, down, up, alpha)
    return LoRAFile(path, layout, layers)


def _safetensors_header(path: Path) -> dict:
    """The `__metadata__` strings of a safetensors file ({} for a pickle)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # already read whole by read_state_dict
        return dict(f.metadata() or {})


# kohya: lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha (a name has no dots)
KOHYA_KEY = re.compile(r"lora_(unet|te)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
KOHYA_PART = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def _kohya_parts(tensors: dict) -> tuple:
    parts, unknown = {}, []
    for key, tensor in tensors.items():
        match = KOHYA_KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        component = "unet" if match[1] == "unet" else "text_encoder"
        parts.setdefault((component, match[2]), {})[KOHYA_PART[match[3]]] = tensor
    return parts, unknown


# diffusers' spellings from 2023, rewritten to PEFT's before a key is parsed
OLDER_DIFFUSERS_SPELLINGS = [
    (r"\.processor\.", "."),  # attention processors: attn1.processor.to_q_lora.down.weight
    (r"\.self_attn\.to_(q|k|v)_lora\.", r".self_attn.\1_proj.lora."),  # the text encoder's
    (r"\.self_attn\.to_out_lora\.", ".self_attn.out_proj.lora."),
    (r"\.to_(q|k|v)_lora\.", r".to_\1.lora."),
    (r"\.to_out_lora\.", ".to_out.0.lora."),
    (r"\.lora_linear_layer\.", ".lora."),  # text_encoder ... q_proj.lora_linear_layer.down.weight
    (r"\.lora\.down\.weight$", ".lora_A.weight"),  # LoRACompatibleLinear: to_q.lora.down.weight
    (r"\.lora\.up\.weight$", ".lora_B.weight"),
]
DIFFUSERS_KEY = re.compile(r"(?:(unet|text_encoder)\.)?(.+)\.(lora_A\.weight|lora_B\.weight|alpha)")
DIFFUSERS_PART = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_emb")


def _diffusers_parts(tensors: dict) -> tuple:
    parts, unknown = {}, []
    for key, tensor in tensors.items():
        canonical = key
        for pattern, replacement in OLDER_DIFFUSERS_SPELLINGS:
            canonical = re.sub(pattern, replacement, canonical)
        match = DIFFUSERS_KEY.fullmatch(canonical)
        component = match and (match[1] or ("unet" if match[2].startswith(UNET_BLOCKS) else None))
        if not component:  # the first attention-processor files held the UNet's without a prefix
            unknown.append(key)
            continue
        name = match[2]
        if component == "text_encoder" and not name.startswith("text_model."):
            name = "text_model." + name  # transformers 5 saves CLIPTextModel without it
        parts.setdefault((component, name), {})[DIFFUSERS_PART[match[3]]] = tensor
    return parts, unknown


def _down_and_up(path: Path, name: str, found: dict) -> tuple:
    """A layer's A and B, checked: both present, floating point, 2-D or 1x1, one rank."""
    for part, other in (("down", "up"), ("up", "down")):
        if part not in found:
            raise CheckpointError(
                f"{path}: {name} has its {other} matrix but no {part} matrix: every LoRA layer "
                "needs both (the file is incomplete or damaged)"
            )
    down, up = found["down"], found["up"]
    if not (down.is_floating_point() and up.is_floating_point()):
        raise CheckpointError(f"{path}: {name} is stored as {down.dtype}, not floating point")
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        raise CheckpointError(
            f"{path}: {name} holds a {down.shape[2]}x{down.shape[3]} convolution's update "
            f"(A {tuple(down.shape)}): this is a LoCon / LyCORIS file, which adapts the UNet's "
            "3x3 convolutions; minildm reads LoRAs of linear layers and 1x1 convolutions only"
        )
    one_by_one = down.shape[2:] in ((), (1, 1)) and up.shape[2:] in ((), (1, 1))
    if down.ndim not in (2, 4) or up.ndim != down.ndim or not one_by_one:
        raise CheckpointError(
            f"{path}: {name} has A {tuple(down.shape)} and B {tuple(up.shape)}; expected "
            "(r, in) and (out, r), or (r, in, 1, 1) and (out, r, 1, 1)"
        )
    if down.shape[0] != up.shape[1]:
        raise CheckpointError(
            f"{path}: {name} has A {tuple(down.shape)} of rank {down.shape[0]} but B "
            f"{tuple(up.shape)} of rank {up.shape[1]}: the two must share their rank r "
            "(the file is damaged, or two LoRAs were mixed)"
        )
    return down, up


def _scalar(path: Path, name: str, tensor: torch.Tensor) -> float:
    value = float(tensor.float().reshape(-1)[0]) if tensor.numel() == 1 else math.nan
    if not math.isfinite(value) or value < 0:
        raise CheckpointError(
            f"{path}: {name}.alpha is {tuple(tensor.shape)} {tensor.flatten()[:3].tolist()}; "
            "expected one non-negative number (the update is scaled by alpha / rank)"
        )
    return value


def _kohya_alpha(path: Path, name: str, tensor, rank: int) -> float:
    if tensor is None:
        return float(rank)  # files from before kohya stored alpha
    alpha = _scalar(path, name, tensor)
    return alpha if alpha > 0 else float(rank)  # sd-scripts: "if alpha == 0 or None, alpha is rank"


def _kohya_declared_rank(header: dict) -> int | None:
    """ss_network_dim, unless the rank varies by design ("Dynamic" after resize_lora.py, or the
    block_dims option, which gives each UNet block its own)."""
    dim = header.get("ss_network_dim", "")
    if not dim.isdigit() or "block_dims" in header.get("ss_network_args", ""):
        return None
    return int(dim)


def _peft_config(path: Path, header: dict) -> dict:
    """{component: its LoraConfig values} from diffusers' "lora_adapter_metadata"."""
    text = header.get("lora_adapter_metadata")
    if text is None:
        return {}
    try:
        metadata = json.loads(text)
        assert isinstance(metadata, dict)
    except (json.JSONDecodeError, AssertionError):
        raise CheckpointError(
            f"{path}: its lora_adapter_metadata is not a JSON object: {text[:100]!r}"
        ) from None
    config = {}
    for key, value in metadata.items():
        component, _, option = key.partition(".")
        config.setdefault(component, {})[option] = value
    for component, options in config.items():
        if options.get("use_dora"):
            raise CheckpointError(
                f"{path}: its {component} adapter is a DoRA (use_dora in lora_adapter_metadata), "
                "whose update also rescales each column of the weight; minildm reads plain LoRA"
            )
    return config


def _peft_rank_and_alpha(path: Path, name: str, options: dict | None, module: str) -> tuple:
    """(declared rank, alpha) of one layer from its component's LoraConfig: `rank_pattern` and
    `alpha_pattern` by PEFT's rule (the first key that is the name or its dotted end), else `r`
    and `lora_alpha`. No config: (None, None), alpha = rank."""
    if not options:
        return None, None

    def by_pattern(patterns: dict, default):
        for key, value in (patterns or {}).items():
            if re.fullmatch(rf"(.*\.)?(?:{key})", module):
                return value
        return default

    rank = by_pattern(options.get("rank_pattern"), options.get("r"))
    alpha = by_pattern(options.get("alpha_pattern"), options.get("lora_alpha"))
    number = (int, float)
    rank_fits = rank is None or (type(rank) is int and rank > 0)
    alpha_fits = alpha is None or (type(alpha) in number and math.isfinite(alpha) and alpha >= 0)
    if not (rank_fits and alpha_fits):
        raise CheckpointError(
            f"{path}: lora_adapter_metadata gives {name} rank {rank!r} and alpha {alpha!r}; "
            "expected a positive whole number and a non-negative number"
        )
    if alpha is not None and options.get("use_rslora") and rank:
        alpha = alpha * math.sqrt(rank)  # rank-stabilised: alpha / sqrt(r) = (alpha sqrt(r)) / r
    return rank, alpha


def _diffusers_alpha(path: Path, name: str, tensor, configured, rank: int) -> float:
    if tensor is None:
        return float(rank if configured is None else configured)
    alpha = _scalar(path, name, tensor)  # some converters keep kohya's alpha beside lora_A/B
    alpha = alpha if alpha > 0 else float(rank)  # and with it kohya's meaning of 0
    if configured is not None and not math.isclose(alpha, configured):
        raise CheckpointError(
            f"{path}: {name}.alpha is {alpha}, but lora_adapter_metadata gives {configured}"
        )
    return alpha


# --- Files for other models -------------------------------------------------------------------

SDXL_SIGNS = [  # (what a key shows, what it means)
    (r"lora_te[12]_", "two text encoders (lora_te1_, lora_te2_)"),
    (r"lora_unet_(input_blocks|middle_block|output_blocks)_", "the SDXL UNet's block names"),
    (r"text_encoder_2\.", "a second text encoder (text_encoder_2.)"),
    (r".*(add_embedding|label_emb)", "the added conditioning's embedding (add_embedding)"),
    (r".*transformer_blocks[._][1-9]", "several transformer blocks per attention level"),
]
OTHER_KINDS = [  # tensors of adapters that are not plain LoRA, and what to say
    (r".*(dora_scale|lora_magnitude_vector)", "DoRA tensors (dora_scale, lora_magnitude_vector)"),
    (
        r".*(hada_|lokr_|lora_mid|\.diff$|\.diff_b$|oft_|\.w_norm$|\.b_norm$)",
        "LyCORIS tensors (LoHa, LoKr, LoCon's Tucker factor, OFT or weight differences)",
    ),
    (r".*(lora_B|lora_up)\.bias$", "a bias on the update (PEFT's lora_bias)"),
    (r"(?!.*lora).*\.(weight|bias)", "a model's own weights (a checkpoint, not a LoRA)"),
]


def _refuse_other_models(path: Path, tensors: dict, header: dict):
    version = header.get("ss_base_model_version", "")  # kohya's header: sd_v1, sd_v2, sdxl_base...
    evidence = [f"ss_base_model_version {version}"] if version.startswith("sdxl") else []
    for pattern, meaning in SDXL_SIGNS:
        evidence += [f"{meaning}, e.g. {key}" for key in tensors if re.match(pattern, key)][:1]
    if evidence:
        raise CheckpointError(
            f"{path}: this looks like an SDXL LoRA; minildm implements SD 1.x ({evidence[0]})"
        )
    if header.get("ss_v2") == "True" or version.startswith("sd_v2"):
        raise CheckpointError(
            f"{path}: this looks like an SD 2.x LoRA (its header says ss_v2 / "
            f"{version or 'sd_v2'}); minildm implements SD 1.x"
        )


def _unknown_keys_error(path: Path, unknown: list) -> CheckpointError:
    cause = (
        "they are not LoRA tensors of either layout minildm reads (diffusers/PEFT's "
        "<layer>.lora_A.weight / lora_B.weight, kohya's lora_unet_<layer>.lora_down.weight / "
        "lora_up.weight / alpha)"
    )
    for pattern, meaning in OTHER_KINDS:
        if any(re.fullmatch(pattern, key) for key in unknown):
            cause = f"the file holds {meaning}, which minildm does not read (it reads plain LoRA)"
            break
    shown = ", ".join(sorted(unknown)[:3]) + (" ..." if len(unknown) > 3 else "")
    return CheckpointError(f"{path}: {len(unknown)} keys are not understood ({shown}): {cause}")


# --- The models' layers, by the files' names --------------------------------------------------


def adaptable_layers(model: nn.Module) -> dict:
    """{name: layer} of every linear layer and 1x1 convolution of `model` a LoRA can adapt (an
    already adapted one by its own name, not by its LoRALayer's insides)."""
    adapted = {name: module.base for name, module in lora_layers(model).items()}
    inside = tuple(name + "." for name in adapted)
    plain = {
        name: module
        for name, module in model.named_modules()
        if adaptable(module) and not (inside and name.startswith(inside))
    }
    return {**plain, **adapted}


def file_layer_names(model: nn.Module, component: str, layout: str) -> dict:
    """{a layer's name in a `layout` file (without the component's prefix): our name}, from the
    model's own key map: diffusers' names for the UNet, transformers' for the text encoder."""
    table = {}
    for ours in adaptable_layers(model):
        if component == "unet":
            theirs = diffusers_name(ours + ".weight", model.config).removesuffix(".weight")
        else:
            theirs = transformers_name(ours + ".weight").removesuffix(".weight")
        if layout == "kohya":
            theirs = theirs.replace(".", "_")
        assert table.setdefault(theirs, ours) == ours, f"{theirs} would name two layers"
    return table


# --- Applying and writing ---------------------------------------------------------------------


def apply_lora(unet, text_encoder, lora, scale: float = 1.0, adapter: str = "lora") -> dict:
    """Add the LoRA (a path or a `read_lora` result) to the UNet and text encoder, unfused, as the
    update called `adapter` at `scale` (minildm.lora.add_lora; A, B and alpha from the file).
    Every check runs first: nothing changes when the file does not fit.
    -> {"unet": [our names of the adapted layers], "text_encoder": [...]}."""
    if not isinstance(lora, LoRAFile):
        lora = read_lora(lora)
    models = {"unet": unet, "text_encoder": text_encoder}
    check_adapter_name(adapter, [model for model in models.values() if model is not None])
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    plan = plan_lora(models, lora)
    adapted = {component: [] for component in COMPONENTS}
    for component, ours, weights in plan:
        update = add_lora(models[component], [ours], weights.rank, weights.alpha, adapter)[ours]
        with torch.no_grad():
            update.down.weight.copy_(weights.down.reshape(update.down.weight.shape))
            update.up.weight.copy_(weights.up.reshape(update.up.weight.shape))
        update.scale = float(scale)
        adapted[component].append(ours)
    return adapted


def check_adapter_name(adapter, models: list):
    """A name nn.ModuleDict accepts, and not one already loaded."""
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise ValueError(f"an adapter name is a non-empty string without dots, got {adapter!r}")
    if hasattr(nn.ModuleDict(), adapter):
        raise ValueError(f"{adapter!r} is the name of a ModuleDict attribute; choose another")
    for model in models:
        if any(adapter in layer.updates for layer in lora_layers(model).values()):
            raise ValueError(
                f"a LoRA called {adapter!r} is already loaded: choose another adapter name, or "
                "unload it first"
            )


def plan_lora(models: dict, lora: LoRAFile) -> list:
    """[(component, our layer name, LayerWeights)] after checking every layer of the file against
    the models: each found, each of the layer's widths."""
    tables, layers, unknown, plan = {}, {}, collections.defaultdict(list), []
    for (component, name), weights in lora.layers.items():
        model = models[component]
        if model is None:
            raise ValueError(f"{lora.path} adapts the {component}, and none was given")
        if component not in tables:
            tables[component] = file_layer_names(model, component, lora.layout)
            layers[component] = adaptable_layers(model)
        ours = tables[component].get(name)
        if ours is None:
            unknown[component].append(weights.name)
            continue
        _check_widths(lora.path, weights, ours, layers[component][ours])
        plan.append((component, ours, weights))
    for component, names in unknown.items():
        names = sorted(names)
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        raise CheckpointError(
            f"{lora.path}: {len(names)} of its layers are not in this {component} ({shown}): the "
            "LoRA was made for a model of another architecture (for instance an SD 1.x LoRA "
            "loaded into a smaller model such as minildm's tiny SD)"
        )
    return plan


def _check_widths(path: Path, weights: LayerWeights, ours: str, layer: nn.Module):
    out_features, in_features = layer.weight.shape[:2]
    down, up = weights.down, weights.up
    if down.shape[1] == in_features and up.shape[0] == out_features:
        return
    widths = {down.shape[1], up.shape[0]}
    hint = "the LoRA was made for another model"
    if 2048 in widths:
        hint = "this looks like an SDXL LoRA; minildm implements SD 1.x"
    elif 1024 in widths and ".attn2." in ours + ".":
        hint = (
            "this looks like an SD 2.x LoRA (a 1024-wide text context); minildm implements SD 1.x"
        )
    raise CheckpointError(
        f"{path}: {weights.name} maps {down.shape[1]} -> {up.shape[0]} channels (A "
        f"{tuple(down.shape)}, B {tuple(up.shape)}), but the layer {ours} maps {in_features} -> "
        f"{out_features} ({tuple(layer.weight.shape)}): {hint}"
    )


def write_lora(path, unet, text_encoder, adapter: str = "lora", layout: str = "diffusers") -> Path:
    """Write the unfused LoRA called `adapter` as a safetensors file in the diffusers/PEFT layout
    (with the LoraConfig diffusers reads alpha from) or kohya's (with its alpha tensors and
    header). Its scale is the user's dial, not part of the file. -> the path."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    tensors, written = {}, {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        theirs = {ours: name for name, ours in file_layer_names(model, component, layout).items()}
        for ours, layer in lora_layers(model).items():
            if adapter not in layer.updates:
                continue
            update = layer.updates[adapter]
            down, up = update.down.weight.detach(), update.up.weight.detach()  # (r, in), (out, r)
            if layer.base.weight.ndim == 4:  # a 1x1 convolution: as its weights are stored
                down, up = down[:, :, None, None], up[:, :, None, None]
            if layout == "kohya":
                stem = KOHYA_PREFIX[component] + theirs[ours]
                tensors[stem + ".lora_down.weight"] = down
                tensors[stem + ".lora_up.weight"] = up
                tensors[stem + ".alpha"] = torch.tensor(update.alpha, dtype=torch.float32)
            else:
                stem = f"{component}.{theirs[ours]}"
                tensors[stem + ".lora_A.weight"] = down
                tensors[stem + ".lora_B.weight"] = up
            written.setdefault(component, {})[theirs[ours]] = (update.rank, update.alpha)
    if not tensors:
        raise ValueError(f"no LoRA called {adapter!r} is loaded (unfused) in these models")
    if layout == "kohya":
        metadata = _kohya_header(written)
    else:
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(_peft_metadata(written))}
    tensors = {key: tensor.contiguous().cpu() for key, tensor in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def _peft_metadata(written: dict) -> dict:
    """diffusers' lora_adapter_metadata: each component's LoraConfig, keys prefixed by it. The
    text encoder's layers are named without `text_model.`, which PEFT matches by their end, so
    that transformers 4 and 5 both find them."""
    metadata = {}
    for component, layers in written.items():
        layers = {name.removeprefix("text_model."): value for name, value in layers.items()}
        rank = collections.Counter(r for r, _ in layers.values()).most_common(1)[0][0]
        alpha = collections.Counter(a for _, a in layers.values()).most_common(1)[0][0]
        metadata[f"{component}.r"] = rank
        metadata[f"{component}.lora_alpha"] = alpha
        metadata[f"{component}.target_modules"] = sorted(layers)
        # exact names (a dot in a pattern matches any character, and still the same name)
        metadata[f"{component}.rank_pattern"] = {n: r for n, (r, _) in layers.items() if r != rank}
        metadata[f"{component}.alpha_pattern"] = {
            n: a for n, (_, a) in layers.items() if a != alpha
        }
    return metadata


def _kohya_header(written: dict) -> dict:
    ranks = {r for layers in written.values() for r, _ in layers.values()}
    alphas = {a for layers in written.values() for _, a in layers.values()}
    return {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": "sd_v1",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }
