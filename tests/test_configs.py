"""Config files with random values (hypothesis, fixed seeds): each kind of config file a pipeline
folder holds, each of its keys (and every key the checks know) set to random JSON values or
removed, then read by minildm's reader for that file. The reader either accepts the file or raises
its own error naming the file; never a raw exception, never a giant allocation (issue 28).

Then the probes of issue 28 by name, each an error naming the file and the key.
"""

import collections
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minildm
from minildm import schedulers
from minildm.checkpoints.configs import (
    COMPONENT_VALUES,
    MODEL_INDEX_VALUES,
    SCHEDULER_VALUES,
    TOKENIZER_VALUES,
)
from minildm.checkpoints.load import (
    load_component,
    load_scheduler,
    load_tokenizer,
    read_model_index,
)
from minildm.checkpoints.weights import CheckpointError, read_state_dict

EXAMPLES = 80  # per kind of file
TINY = {system: Path(folder) for system, folder in minildm.TINY_MODELS.items()}

# the scheduler configs of other algorithms, as minildm writes them (scheduler.config)
OTHER_SCHEDULERS = [
    "EulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
    "KDPM2DiscreteScheduler",
]

# (name, the folder it lives in, the file, the reader)
KINDS = [
    *[
        (f"{system}/{part}", TINY[system] / part, "config.json", load_component)
        for system, part in [
            ("sd", "unet"),
            ("sd", "vae"),
            ("sd", "text_encoder"),
            ("ldm", "bert"),
            ("ldm", "unet"),
            ("ldm-uncond", "unet"),
            ("ldm-uncond", "vqvae"),
            ("vq-diffusion", "transformer"),
            ("vq-diffusion", "learned_classifier_free_sampling_embeddings"),
        ]
    ],
    ("sd/scheduler", TINY["sd"] / "scheduler", "scheduler_config.json", load_scheduler),
    (
        "vq-diffusion/scheduler",
        TINY["vq-diffusion"] / "scheduler",
        "scheduler_config.json",
        load_scheduler,
    ),
    *[
        (
            f"{name} (sd's schedule)",
            TINY["sd"] / "scheduler",
            "scheduler_config.json",
            load_scheduler,
        )
        for name in OTHER_SCHEDULERS
    ],
    ("sd/tokenizer", TINY["sd"] / "tokenizer", "tokenizer_config.json", load_tokenizer),
    ("ldm/tokenizer", TINY["ldm"] / "tokenizer", "tokenizer_config.json", load_tokenizer),
    (
        "sd/model_index.json",
        TINY["sd"],
        "model_index.json",
        partial(read_model_index, expected_class="StableDiffusionPipeline"),
    ),
]

RULES = {"scheduler_config.json": SCHEDULER_VALUES}
RULES["tokenizer_config.json"] = TOKENIZER_VALUES
RULES["model_index.json"] = MODEL_INDEX_VALUES

# values a hostile or careless config holds: the issue's probes, wrong types, edges of ranges
PLAUSIBLE = st.sampled_from(
    [
        0,
        -1,
        1,
        2,
        3,
        4,
        7,
        8,
        16,
        32,
        64,
        77,
        1000,
        10**12,
        2**63,
        1e-6,
        0.5,
        1000.0,
        1e12,
        float("nan"),
        float("inf"),
        "4",
        "",
        "linear",
        True,
        False,
        None,
        [],
        [64],
        [64, 96, 96],
        {},
        {"content": 1},
        ["diffusers"],
        ["diffusers", 5],
    ]
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
JSON = st.one_of(
    PLAUSIBLE,
    st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(st.text(max_size=5), children, max_size=3),
        ),
        max_leaves=6,
    ),
)


def original_config(name, folder, file) -> dict:
    config = json.loads((folder / file).read_text())
    if name.split(" ")[0] in OTHER_SCHEDULERS:
        scheduler = getattr(schedulers, name.split(" ")[0]).from_config(config)
        config = json.loads(json.dumps(dict(scheduler.config)))
    return config


def folder_with(tmp: Path, folder: Path, file: str, config: dict) -> Path:
    """A copy of `folder` (its other files linked, not copied) with `file` holding `config`."""
    copy = tmp / folder.name
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir(parents=True)
    for path in folder.iterdir():
        if path.name != file:
            (copy / path.name).symlink_to(path.resolve())
    (copy / file).write_text(json.dumps(config))
    return copy


COUNTS = collections.defaultdict(collections.Counter)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, folder, file, reader", KINDS, ids=[kind[0] for kind in KINDS])
def test_random_config_values_get_the_error_that_names_the_file(
    name, folder, file, reader, tmp_path
):
    original = original_config(name, folder, file)
    reader(folder_with(tmp_path, folder, file, original))  # the file as shipped is read
    rules = RULES.get(file)
    if file == "config.json":
        rules = COMPONENT_VALUES[original.get("_class_name") or original["architectures"][0]]
    keys = sorted(set(original) | set(rules))
    counts = COUNTS[name]

    @settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None)
    @given(st.sampled_from(keys), st.one_of(JSON, st.just("<removed>")))
    def run(key, value):
        config = dict(original)
        if value == "<removed>":
            config.pop(key, None)
        else:
            config[key] = value
        copy = folder_with(tmp_path, folder, file, config)
        try:
            reader(copy)
        except (CheckpointError, ValueError, FileNotFoundError) as error:
            message = str(error)
            assert str(copy) in message, f"{key}={value!r}: the error names no file: {message}"
            counts["refused, naming the file"] += 1
            return
        counts["accepted"] += 1

    run()
    print(f"{name}: {sum(counts.values())} generated files: {dict(counts)}")
    assert counts["refused, naming the file"] > 0 and counts["accepted"] > 0


# --- the probes of the issue, by name -----------------------------------------------------------

PROBES = [
    ("sd", "scheduler", "scheduler_config.json", "num_train_timesteps", 0),
    ("sd", "scheduler", "scheduler_config.json", "num_train_timesteps", 1000.0),
    ("sd", "scheduler", "scheduler_config.json", "num_train_timesteps", 1e12),
    ("sd", "scheduler", "scheduler_config.json", "beta_start", "0.00085"),
    ("sd", "unet", "config.json", "in_channels", "4"),
    ("sd", "vae", "config.json", "block_out_channels", [16, 32, "64", 64]),
    ("sd", "text_encoder", "config.json", "num_hidden_layers", 2.5),
    ("ldm", "tokenizer", "tokenizer_config.json", "model_max_length", "77"),
]


@pytest.mark.parametrize("system, part, file, key, value", PROBES, ids=lambda v: str(v))
def test_the_issues_config_probes_name_the_file_and_key(system, part, file, key, value, tmp_path):
    folder = TINY[system] / part
    config = json.loads((folder / file).read_text())
    copy = folder_with(tmp_path, folder, file, {**config, key: value})
    reader = {"scheduler": load_scheduler, "tokenizer": load_tokenizer}.get(part, load_component)
    with pytest.raises(CheckpointError) as raised:
        reader(copy)
    print(raised.value)
    assert f"{copy / file}: {key} must be" in str(raised.value)


def test_a_weight_map_that_is_a_list_or_leaves_its_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, outside)
    folder = tmp_path / "unet"
    folder.mkdir()
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    cases = [
        ({"weight_map": ["w", "a.safetensors"]}, "weight_map must be an object"),
        ({"weight_map": {"w": "../outside.safetensors"}}, "outside the index's folder"),
        ({"weight_map": {"w": str(outside)}}, "outside the index's folder"),
        ({"weight_map": {"w": 3}}, "weight_map must be an object"),
    ]
    for content, words in cases:
        index.write_text(json.dumps(content))
        with pytest.raises(CheckpointError) as raised:
            read_state_dict(index)
        print(raised.value)
        assert str(index) in str(raised.value) and words in str(raised.value)


@pytest.mark.parametrize(
    "merges, words",
    [
        ("#version: 0.2\nthis line has four\n", "line 2: expected two tokens"),
        ("#version: 0.2\nq u\n\x00 \x01\n", "expected two tokens of vocab.json"),
        ("#version: 0.2\nnotatoken other\n", "line 2: expected two tokens"),
    ],
)
def test_a_garbage_merges_file_names_its_line(merges, words, tmp_path):
    folder = TINY["sd"] / "tokenizer"
    copy = folder_with(tmp_path, folder, "merges.txt", {})
    (copy / "merges.txt").write_text(merges)
    with pytest.raises(CheckpointError) as raised:
        load_tokenizer(copy)
    print(raised.value)
    assert str(copy / "merges.txt") in str(raised.value) and words in str(raised.value)


def test_int32_weights_are_loaded_or_refused_by_name(tmp_path):
    """A weights file whose float tensors were saved as int32: the strict loader refuses it with
    the file's name, instead of failing deep in torch."""
    folder = TINY["sd"] / "vae"
    weights = read_state_dict(folder / "diffusion_pytorch_model.safetensors")
    copy = folder_with(tmp_path, folder, "diffusion_pytorch_model.safetensors", {})
    from safetensors.torch import save_file

    (copy / "diffusion_pytorch_model.safetensors").unlink()
    save_file(
        {k: v.to(torch.int32) for k, v in weights.items()},
        copy / "diffusion_pytorch_model.safetensors",
    )
    with pytest.raises(CheckpointError) as raised:
        load_component(copy)
    print(raised.value)
    assert "diffusion_pytorch_model.safetensors" in str(raised.value)
    assert "int32" in str(raised.value)


# the command line reads the same files through the same checks (its scheduler is planned before
# the weights load): (system, part, file, change, words after the file's name)
COMMAND_LINE_PROBES = [
    ("sd", "scheduler", "scheduler_config.json", {"steps_offset": -1}, "steps_offset must be"),
    ("sd", "scheduler", "scheduler_config.json", {"trained_betas": "abc"}, "trained_betas must"),
    ("sd", "scheduler", "scheduler_config.json", {"timestep_spacing": "weird"}, "timestep_spacing"),
    ("sd", "unet", "config.json", {"layers_per_block": -3}, "layers_per_block must be"),
    ("sd", "vae", "config.json", {"scaling_factor": "0.18"}, "scaling_factor must be"),
    ("sd", "", "model_index.json", {"unet": "diffusers"}, "unet must be a [library, class] pair"),
    ("ldm", "bert", "config.json", {"encoder_layers": 0}, "encoder_layers must be"),
    ("vq-diffusion", "transformer", "config.json", {"num_vector_embeds": 1}, "num_vector_embeds"),
]


@pytest.mark.parametrize(
    "system, part, file, change, words", COMMAND_LINE_PROBES, ids=lambda v: str(v)
)
def test_the_command_line_names_the_config_file_and_key(
    system, part, file, change, words, tmp_path, capsys
):
    from minildm.__main__ import main

    copy = tmp_path / "weights"
    shutil.copytree(TINY[system], copy)
    path = copy / part / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(SystemExit) as raised:
        main(
            [system, "a red circle", "--steps", "2", "--weights", str(copy), "--out", str(tmp_path)]
        )
    printed = capsys.readouterr().err.strip()
    print(f"exit {raised.value.code}: {printed}")
    assert raised.value.code == 2 and f"error: {path}" in printed and words in printed
    assert not list(tmp_path.glob("*.png"))


def test_a_vq_diffusion_scheduler_of_another_model_is_refused_before_sampling():
    pipe = minildm.VQDiffusionPipeline.from_pretrained(minildm.TINY_VQ_DIFFUSION)
    for options in ({"num_vec_classes": 3, "num_train_timesteps": 50}, {"num_vec_classes": 513}):
        pipe.scheduler = schedulers.VQDiffusionScheduler(**options)
        with pytest.raises(ValueError) as raised:
            pipe("a red circle", num_inference_steps=2)
        print(raised.value)
        assert "the scheduler is another model's" in str(raised.value)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: schedulers.DDIMScheduler(num_train_timesteps=10**9), "num_train_timesteps must"),
        (lambda: schedulers.EulerDiscreteScheduler(beta_start="0.1"), "beta_start must be"),
        (lambda: schedulers.VQDiffusionScheduler(num_vec_classes=0), "num_vec_classes must be"),
        (
            lambda: schedulers.VQDiffusionScheduler(num_train_timesteps=10**9),
            "num_train_timesteps must",
        ),
        (lambda: schedulers.VQDiffusionScheduler(alpha_cum_start=2.0), "alpha_cum_start must"),
    ],
    ids=["DDIM 1e9 steps", "Euler string beta", "VQ 0 classes", "VQ 1e9 steps", "VQ alpha 2"],
)
def test_scheduler_constructors_refuse_what_would_allocate_or_index_wrongly(make, words):
    with pytest.raises(ValueError) as raised:
        make()
    print(raised.value)
    assert words in str(raised.value)
