"""What the config files of a pipeline folder may hold: the type and range of every value minildm
reads, one table per kind of file, checked when the file is read, before anything is built. An
error names the file, the key, what was expected and what was found.

- a model's `config.json` (diffusers' and transformers' keys): COMPONENT_VALUES
- `scheduler/scheduler_config.json`: SCHEDULER_VALUES (every scheduler's constructor arguments)
- `tokenizer/`: `tokenizer_config.json` (TOKENIZER_VALUES), vocab.json, merges.txt, vocab.txt
- `model_index.json`: {component: [library, class]}

The ranges are generous (about a hundred times the official models' values) but finite: a
`num_train_timesteps` of 1e12 would otherwise ask for a 4 TB table of betas.
"""

import json
import math
from pathlib import Path

from minildm.checkpoints.weights import CheckpointError, read_json


class Rule:
    """A value's allowed type and range: `accepts(value)`, and `what` for the message."""

    def __init__(self, what: str, accepts):
        self.what, self.accepts = what, accepts


def integer(low: int, high: int) -> Rule:
    return Rule(
        f"an integer in [{low}, {high}]",
        lambda v: type(v) is int and low <= v <= high,  # bool is not an int here
    )


def number(low: float, high: float, above_low=False) -> Rule:
    """A finite number in [low, high] ((low, high] when above_low)."""

    def accepts(v):
        if type(v) not in (int, float) or not math.isfinite(v):
            return False
        return (low < v if above_low else low <= v) and v <= high

    return Rule(f"a number in {'(' if above_low else '['}{low}, {high}]", accepts)


BOOLEAN = Rule("true or false", lambda v: type(v) is bool)
TEXT = Rule("a string", lambda v: type(v) is str)


def choice(*options) -> Rule:
    return Rule(f"one of {list(options)}", lambda v: type(v) is str and v in options)


def listing(rule: Rule, most: int = 16) -> Rule:
    return Rule(
        f"a list of 1 to {most} values, each {rule.what}",
        lambda v: type(v) is list and 1 <= len(v) <= most and all(rule.accepts(x) for x in v),
    )


def optional(rule: Rule) -> Rule:
    return Rule(f"null or {rule.what}", lambda v: v is None or rule.accepts(v))


def either(first: Rule, second: Rule) -> Rule:
    return Rule(f"{first.what}, or {second.what}", lambda v: first.accepts(v) or second.accepts(v))


WIDTH = integer(1, 65536)  # channels, hidden sizes (SD's widest: 1280; CLIP's MLP: 3072)
COUNT = integer(1, 256)  # layers, heads, levels (LDMBert's 32 layers, VQ-Diffusion's 36)
SIZE = integer(1, 16384)  # pixels or latent cells on a side
EPS = number(0, 1, above_low=True)

# config.json of a model, by the class it names: the keys its translation in checkpoints/ reads
# (other keys are diffusers' or transformers' own, often null where they do not apply, and are
# left alone). A nested text_config or vision_config is checked with the same table.
UNET_VALUES = {
    "in_channels": WIDTH,
    "out_channels": WIDTH,
    "block_out_channels": listing(WIDTH),
    "down_block_types": listing(TEXT),
    "up_block_types": listing(TEXT),
    "layers_per_block": COUNT,
    "norm_num_groups": COUNT,
    "norm_eps": EPS,
    "sample_size": SIZE,
    "attention_head_dim": optional(either(WIDTH, listing(WIDTH))),
    "num_attention_heads": optional(COUNT),
    "cross_attention_dim": WIDTH,
}
AUTOENCODER_VALUES = {
    "in_channels": WIDTH,
    "out_channels": WIDTH,
    "latent_channels": WIDTH,
    "block_out_channels": listing(WIDTH),
    "down_block_types": listing(TEXT),
    "up_block_types": listing(TEXT),
    "layers_per_block": COUNT,
    "norm_num_groups": COUNT,
    "scaling_factor": optional(number(0, 1000, above_low=True)),
    "num_vq_embeddings": integer(1, 1 << 20),
    "vq_embed_dim": optional(WIDTH),
}
CLIP_VALUES = {
    "vocab_size": integer(1, 1 << 24),
    "max_position_embeddings": integer(1, 4096),
    "hidden_size": WIDTH,
    "num_hidden_layers": COUNT,
    "num_attention_heads": COUNT,
    "intermediate_size": WIDTH,
    "layer_norm_eps": EPS,
    "hidden_act": TEXT,
    "image_size": SIZE,
    "patch_size": SIZE,
    "num_channels": WIDTH,
    "projection_dim": WIDTH,
}
COMPONENT_VALUES = {
    "UNet2DConditionModel": UNET_VALUES,
    "UNet2DModel": UNET_VALUES,
    "AutoencoderKL": AUTOENCODER_VALUES,
    "VQModel": AUTOENCODER_VALUES,
    "CLIPTextModel": CLIP_VALUES,
    "StableDiffusionSafetyChecker": CLIP_VALUES,
    "LDMBertModel": {
        "vocab_size": integer(1, 1 << 24),
        "max_position_embeddings": integer(1, 4096),
        "d_model": WIDTH,
        "encoder_layers": COUNT,
        "encoder_attention_heads": COUNT,
        "head_dim": WIDTH,
        "encoder_ffn_dim": WIDTH,
        "activation_function": TEXT,
    },
    "Transformer2DModel": {  # VQ-Diffusion's, with discrete inputs
        "num_vector_embeds": integer(2, 1 << 20),
        "sample_size": SIZE,
        "num_layers": COUNT,
        "num_attention_heads": COUNT,
        "attention_head_dim": WIDTH,
        "cross_attention_dim": optional(WIDTH),
        "num_embeds_ada_norm": integer(1, 100000),
        "norm_type": TEXT,
    },
    "LearnedClassifierFreeSamplingEmbeddings": {
        "learnable": BOOLEAN,
        "length": integer(1, 4096),
        "hidden_size": WIDTH,
    },
}
NESTED_CONFIGS = ("text_config", "vision_config")

# scheduler_config.json: the constructor arguments of every minildm scheduler
TIMESTEPS = integer(1, 100000)  # SD trains on 1000, VQ-Diffusion on 100
SCHEDULER_VALUES = {
    "_class_name": TEXT,
    "num_train_timesteps": TIMESTEPS,
    "beta_start": number(0, 1),
    "beta_end": number(0, 1),
    "beta_schedule": TEXT,
    "trained_betas": optional(
        Rule(
            "a list of up to 100000 numbers in (0, 1]",
            lambda v: (
                type(v) is list
                and 1 <= len(v) <= 100000
                and all(type(b) in (int, float) and 0 < b <= 1 for b in v)
            ),
        )
    ),
    "prediction_type": TEXT,
    "timestep_spacing": TEXT,
    "steps_offset": integer(0, 100000),
    "clip_sample": BOOLEAN,
    "clip_sample_range": number(0, 1e6, above_low=True),
    "set_alpha_to_one": BOOLEAN,
    "skip_prk_steps": BOOLEAN,
    "use_karras_sigmas": BOOLEAN,
    "lower_order_final": BOOLEAN,
    "solver_order": integer(1, 3),
    "solver_type": TEXT,
    "algorithm_type": TEXT,
    "final_sigmas_type": TEXT,
    "variance_type": TEXT,
    "disable_corrector": Rule(
        "a list of step numbers",
        lambda v: type(v) is list and all(type(i) is int and 0 <= i <= 100000 for i in v),
    ),
    # VQ-Diffusion's
    "num_vec_classes": integer(2, 1 << 20),
    "alpha_cum_start": number(0, 1),
    "alpha_cum_end": number(0, 1),
    "gamma_cum_start": number(0, 1),
    "gamma_cum_end": number(0, 1),
}

SPECIAL_TOKEN = either(
    TEXT,
    Rule(
        "an object with a string 'content'",
        lambda v: type(v) is dict and type(v.get("content")) is str,
    ),
)
TOKENIZER_VALUES = {
    "model_max_length": optional(
        Rule(
            "an integer >= 2, or a number over 1e6 (transformers' 'no limit')",
            lambda v: (type(v) is int and v >= 2) or (type(v) in (int, float) and v > 1e6),
        )
    ),
    "do_lower_case": BOOLEAN,
    "pad_token": optional(SPECIAL_TOKEN),
}

# model_index.json's settings; every other key names a component
MODEL_INDEX_VALUES = {"requires_safety_checker": BOOLEAN}


def check_values(path, config: dict, rules: dict):
    """Every key of `config` that `rules` names holds a value its rule accepts."""
    for key, rule in rules.items():
        if key in config and not rule.accepts(config[key]):
            raise CheckpointError(
                f"{path}: {key} must be {rule.what}, found {shown(config[key])}: fix the file, "
                "or download the folder again"
            )


def shown(value) -> str:
    text = json.dumps(value) if _is_json(value) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def check_component_config(path, config: dict, class_name: str):
    """The values `class_name`'s translation reads (an unknown class is refused by its loader)."""
    rules = COMPONENT_VALUES.get(class_name, {})
    check_values(path, config, rules)
    for nested in NESTED_CONFIGS:
        if nested in config:
            if type(config[nested]) is not dict:
                raise CheckpointError(
                    f"{path}: {nested} must be an object, found {shown(config[nested])}"
                )
            check_values(f"{path} ({nested})", config[nested], rules)


def check_model_index(path, index: dict):
    """{component: [library, class name]} (or [null, null] for a component left out)."""
    check_values(path, index, MODEL_INDEX_VALUES)
    for name, value in index.items():
        if name.startswith("_") or name in MODEL_INDEX_VALUES:
            continue
        pair = type(value) is list and len(value) == 2
        if not pair or not all(v is None or type(v) is str for v in value):
            raise CheckpointError(
                f"{path}: {name} must be a [library, class] pair such as "
                f'["diffusers", "UNet2DConditionModel"], found {shown(value)}'
            )


def check_tokenizer_folder(folder: Path):
    """tokenizer_config.json and special_tokens_map.json by TOKENIZER_VALUES; CLIP's vocab.json
    (token -> id) and merges.txt (pairs of tokens, each pair and its merge in the vocabulary, as
    the BPE model needs); BERT's vocab.txt (one token a line, the four special tokens present)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            check_values(folder / name, read_json(folder / name), TOKENIZER_VALUES)
    if (folder / "vocab.json").is_file():
        vocab = read_json(folder / "vocab.json")
        ids = vocab.values()
        if not vocab or not all(type(i) is int and 0 <= i < 1 << 31 for i in ids):
            raise CheckpointError(
                f"{folder / 'vocab.json'}: expected an object of tokens to ids (integers >= 0)"
            )
        path = folder / "merges.txt"
        lines = read_text(path).split("\n") if path.is_file() else []
        for number, line in enumerate(lines, start=1):
            if not line or line.startswith("#version"):
                continue
            pair = line.split()
            if len(pair) != 2 or not all(token in vocab for token in (*pair, "".join(pair))):
                raise CheckpointError(
                    f"{path}, line {number}: expected two tokens of vocab.json whose merge is "
                    f"in it too, found {shown(line)}: fix the file, or download the folder again"
                )
    elif (folder / "vocab.txt").is_file():
        read_text(folder / "vocab.txt")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not UTF-8 text ({error})") from None
