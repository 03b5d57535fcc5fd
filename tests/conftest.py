"""Shared test helpers: oracle imports that may not skip in CI, random weights, error measures."""

import importlib
import os

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def remove_module_temporary_files(request, tmp_path_factory):
    """Delete the temporary folders a test module made once it is done. The parity tests save
    checkpoints at the official configs (the VQ-Diffusion transformer alone is 5.4 GB in float32):
    kept to the end of the session, as pytest does, they add up to over 20 GB, and pytest keeps the
    last three sessions' on top. A module with a failing test keeps its folders, to look at."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failures_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failures_before:
        return
    import shutil

    for path in set(base.iterdir()) - before:
        if path.is_symlink():  # pytest's "<name>current" link to the newest "<name>N" folder
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def host_pace() -> float:
    """How much slower than the CI machine of record this host runs, at least 1: a test's time
    limit is written for that machine and multiplied by this (tests/pace.py)."""
    from pace import measure_pace

    return measure_pace()


def oracle(module_name: str):
    """Import a reference library (diffusers, transformers). Without it a parity test skips locally,
    but fails under CI=true: a parity suite that silently skipped proves nothing."""
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        message = (
            f"oracle {module_name} is not installed ({e}); pip install -r requirements-dev.txt"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, norms and biases included, so that a swapped or skipped
    part changes the output (default init leaves norm weights 1 and biases 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
    return module


def write_clip_hub_folder(folder, pad_token=None):
    """A CLIP tokenizer folder as on the hub (vocab.json + merges.txt), derived here from the
    shipped BPE file by OpenAI's recipe, independently of minildm's own derivation, so the two
    check each other."""
    import gzip
    import json

    from minildm.tokenizer import CLIP_BPE_FILE

    lines = (
        gzip.open(CLIP_BPE_FILE, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    )
    byte_chars = [
        chr(b) for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255
    ]
    byte_chars += [chr(256 + n) for n in range(256 - len(byte_chars))]
    vocab = (
        byte_chars + [c + "</w>" for c in byte_chars] + [line.replace(" ", "") for line in lines]
    )
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8"
    )
    if pad_token:
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    return folder


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|: an error relative to the output's scale."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def clip_hub_layout(ours: dict) -> dict:
    """Rename a minildm CLIPTextModel state dict to the hub's layout (transformers 4 names with the
    `text_model.` prefix), to write test files without a reference library."""
    renames = [
        ("token_embedding", "embeddings.token_embedding"),
        ("position_embedding", "embeddings.position_embedding"),
        ("final_norm", "final_layer_norm"),
        ("layers.", "encoder.layers."),
        (".attn_norm", ".layer_norm1"),
        (".mlp_norm", ".layer_norm2"),
        (".attn.out", ".self_attn.out_proj"),
        (".attn.q", ".self_attn.q_proj"),
        (".attn.k", ".self_attn.k_proj"),
        (".attn.v", ".self_attn.v_proj"),
    ]
    hub = {}
    for key, value in ours.items():
        for old, new in renames:
            key = key.replace(old, new, 1)
        hub["text_model." + key] = value.contiguous()
    return hub


# --- schedulers ---------------------------------------------------------------------------------

# The three official scheduler configs as the hub holds them: scheduler/scheduler_config.json of
# CompVis/stable-diffusion-v1-4 (commit 133a221), CompVis/ldm-text2im-large-256 and
# CompVis/ldm-celebahq-256. The last one's exact keys are inferred from its size (249 bytes) and the
# DDIM keys diffusers had on its upload day (`timesteps`, a key today's diffusers ignores).
SCHEDULER_CONFIGS = {
    "SD v1-4 (PNDM)": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.7.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    },
    "LDM text2im (DDIM)": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.0.4",
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "timestep_values": None,
        "trained_betas": None,
    },
    "CelebA-HQ (DDIM)": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.0.4",
        "beta_end": 0.0195,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.0015,
        "clip_sample": False,
        "timestep_values": None,
        "timesteps": 1000,
        "trained_betas": None,
    },
}


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the UNet: a smooth function of its input and the timestep."""
    return 0.5 * torch.tanh(x) + 0.1 * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 100)


def reference_scheduler(class_name: str, config: dict):
    """diffusers' scheduler of that class from a config, its warnings about other classes' keys
    silenced."""
    import warnings

    diffusers = oracle("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, class_name).from_config(
            {k: v for k, v in config.items() if k != "_class_name"}
        )


def scheduler_from_config(cls, config: dict):
    """minildm's from_config; the only warning allowed is about keys of another scheduler (the blog
    post builds every scheduler from SD's PNDM config, with its skip_prk_steps)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = cls.from_config(config)
    assert all("ignores config keys that do not apply" in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
    return scheduler


def compare_scheduler_steps(
    ours, theirs, num_inference_steps: int, label: str, step_kwargs=None, seed=None, tolerance=1e-6
):
    """Run both schedulers over the same trajectory: the same timesteps, the same model outputs, the
    same sample at every step (the reference's). `seed` gives both the same generator for stochastic
    steps. Returns the worst per-step relative error, and asserts it is below `tolerance`."""
    import warnings

    step_kwargs = step_kwargs or {}
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    assert torch.equal(torch.as_tensor(ours.timesteps).double(), theirs.timesteps.double()), (
        f"{label}: timesteps differ:\n{ours.timesteps}\n{theirs.timesteps}"
    )
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    sample = (
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        * theirs.init_noise_sigma
    )
    ours_kwargs, theirs_kwargs = dict(step_kwargs), dict(step_kwargs)
    if seed is not None:
        ours_kwargs["generator"], theirs_kwargs["generator"] = (
            torch.Generator().manual_seed(seed),
            torch.Generator().manual_seed(seed),
        )
    worst = 0.0
    for t in theirs.timesteps:
        theirs_input = theirs.scale_model_input(sample, t)
        worst = max(worst, max_relative_error(ours.scale_model_input(sample, t), theirs_input))
        output = fake_model(theirs_input, t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs.step(output, t, sample, **theirs_kwargs).prev_sample
        got = ours.step(output, t, sample, **ours_kwargs)
        worst = max(worst, max_relative_error(got, expected))
        sample = expected
    print(
        f"{label}, {num_inference_steps} steps: {len(theirs.timesteps)} timesteps equal, "
        f"worst step relative error {worst:.1e} (tolerance {tolerance:.0e})"
    )
    assert worst < tolerance, f"{label}: relative error {worst:.2e}"
    return worst
