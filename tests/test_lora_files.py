"""LoRA and textual-inversion files (minildm/checkpoints/lora.py, checkpoints/embeddings.py, the
pipeline's load_lora / load_embedding) against diffusers' own loaders.

- LoRAs written by minildm in the diffusers/PEFT layout and in kohya-ss', on every attention
  projection or on every layer kohya adapts, alpha = rank or not, one or two at a time, give the
  images diffusers' `load_lora_weights` gives, at scale 1 and 0.5; an official-size SD v1 UNet with
  a LoRA on every attention projection gives diffusers' output; fusing changes nothing.
- Embeddings: diffusers' layout (1 and 2 vectors) loads to the token ids and images of diffusers'
  `load_textual_inversion`; AUTOMATIC1111's .pt (2022 and later) and kohya's .safetensors give the
  same vectors.
- Refusals name the file and the cause (SDXL, ranks, widths, LoCon, damaged files, a token the
  vocabulary has) and leave the pipeline as it was.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import max_relative_error, oracle
from safetensors.torch import load_file, save_file
from test_unet import SD_CONFIG

import minildm
from minildm.checkpoints.embeddings import read_embedding, write_embedding
from minildm.checkpoints.lora import adaptable_layers, apply_lora, read_lora, write_lora
from minildm.checkpoints.unet import config_from_diffusers, load_unet
from minildm.lora import LoRALayer, add_lora, attention_projections, lora_layers
from minildm.pipelines import StableDiffusionPipeline

TOLERANCE = 1e-4  # max abs difference of images in [0, 1] and of the UNet's output
CALL = dict(
    prompt="a red circle on a blue background",
    height=64,
    width=64,
    num_inference_steps=3,
    guidance_scale=4.0,
    output_type="np",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run faster on one thread than on two competing with other work on a
    2-core host (0.2 s against 7 s per tiny-SD call, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference():
    """diffusers' pipeline on the tiny SD folder, its LoRAs unloaded after each test."""
    diffusers = oracle("diffusers")
    oracle("peft")  # diffusers' LoRA loading runs on PEFT
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for CLIPTextModel", ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    diffusers.utils.logging.set_verbosity(verbosity)


def tiny() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)


def image(pipe, **options) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(generator=generator, **{**CALL, **options}).images


def kohya_layers(model, component: str) -> list:
    """The layers kohya-ss adapts: every linear layer and 1x1 convolution inside the UNet's
    transformers (proj_in, attn1/attn2, ff, proj_out) and the text encoder's layers."""
    inside = ".attention" if component == "unet" else "layers."
    return [name for name in adaptable_layers(model) if inside in name]


def add_random_lora(pipe, adapter: str, layers: str, rank=4, alpha=None, seed=0):
    """Random nonzero A and B (of a size that changes the image visibly, not wildly)."""
    generator = torch.Generator().manual_seed(seed)
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        if layers == "attention":
            names = attention_projections(model)
        else:
            names = kohya_layers(model, component)
        for update in add_lora(model, names, rank, alpha, adapter).values():
            with torch.no_grad():
                down, up = update.down.weight, update.up.weight  # (r, in), (out, r)
                down.copy_(torch.randn(down.shape, generator=generator) / down.shape[1] ** 0.5)
                up.copy_(torch.randn(up.shape, generator=generator) * 0.5 / rank**0.5)


def lora_file(tmp_path, layout, layers, alpha=None, seed=0, name=None):
    source = tiny()
    add_random_lora(source, "made", layers, alpha=alpha, seed=seed)
    path = tmp_path / f"{name or layout + '-' + layers}.safetensors"
    return write_lora(path, source.unet, source.text_encoder, "made", layout=layout)


CASES = {  # name: (layout, layers, alpha)
    "diffusers layout, attention, alpha = rank": ("diffusers", "attention", None),
    "diffusers layout, kohya's layers, alpha 2 (metadata)": ("diffusers", "kohya", 2.0),
    "kohya layout, attention, alpha 2": ("kohya", "attention", 2.0),
    "kohya layout, kohya's layers, alpha 2": ("kohya", "kohya", 2.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_images_match_diffusers(reference, tmp_path, case):
    layout, layers, alpha = CASES[case]
    path = lora_file(tmp_path, layout, layers, alpha)
    keys = load_file(path).keys()
    assert any(".ff." in key or "_ff_" in key for key in keys) == (layers == "kohya")
    ours = tiny()
    base = image(ours)
    adapter = ours.load_lora(path)
    assert adapter == path.stem.replace("-", "_") and ours.lora_names() == [adapter]
    reference.load_lora_weights(str(path), adapter_name="lora")
    try:
        for component in ("unet", "text_encoder"):  # diffusers adapted the same layers
            wrapped = sum(hasattr(m, "lora_A") for m in getattr(reference, component).modules())
            assert wrapped == len(lora_layers(getattr(ours, component))) > 0
        for scale in (1.0, 0.5):
            ours.set_lora_scale(adapter, scale)
            reference.set_adapters(["lora"], adapter_weights=[scale])
            got, expected = image(ours), image(reference)
            error = float(np.abs(got - expected).max())
            change = float(np.abs(got - base).max())
            print(
                f"{case}, scale {scale}: image max abs difference {error:.1e} "
                f"(tolerance {TOLERANCE:.0e}); the LoRA changes the image by {change:.2f}"
            )
            assert error < TOLERANCE and change > 0.05
    finally:
        reference.unload_lora_weights()


def test_two_loras_each_at_its_scale_match_diffusers(reference, tmp_path):
    first = lora_file(tmp_path, "diffusers", "attention", seed=1, name="first")
    second = lora_file(tmp_path, "kohya", "kohya", alpha=2.0, seed=2, name="second")
    ours = tiny()
    ours.load_lora(read_lora(first), scale=0.8)  # a file read beforehand, named by its stem
    ours.load_lora_weights(second, adapter_name="second", scale=0.5)  # diffusers' name, an alias
    reference.load_lora_weights(str(first), adapter_name="first")
    reference.load_lora_weights(str(second), adapter_name="second")
    reference.set_adapters(["first", "second"], adapter_weights=[0.8, 0.5])
    try:
        got, expected = image(ours), image(reference)
    finally:
        reference.unload_lora_weights()
    error = float(np.abs(got - expected).max())
    print(f"two LoRAs at 0.8 and 0.5: image max abs difference {error:.1e} (tolerance 1e-4)")
    assert ours.lora_names() == ["first", "second"] and error < TOLERANCE
    ours.unload_lora()
    assert ours.lora_names() == [] and not lora_layers(ours.unet)
    error = float(np.abs(image(ours) - image(tiny())).max())
    print(f"after unload_lora: {error:.1e} from the model as loaded")
    assert error == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA and an embedding made by minildm's trainer (train/finetune.py), briefly: 40 steps
    each on eight drawings of the star and pink worlds, their latents fitted for 20 steps."""
    from minildm.train import finetune

    folder = tmp_path_factory.mktemp("trained")
    pipe = tiny()
    images, captions, _ = finetune.world_examples("star", 8)
    latents = finetune.fit_latents(pipe.vae, images, steps=20)
    finetune.lora_finetune(pipe, latents, captions, max_steps=40, seconds=1e9, adapter="star")
    files = {
        layout: write_lora(folder / f"star-{layout}.safetensors", pipe.unet, pipe.text_encoder,
                           "star", layout=layout)
        for layout in ("diffusers", "kohya")
    }  # fmt: skip
    pipe = tiny()
    images, captions, _ = finetune.world_examples("pink", 8)
    latents = finetune.fit_latents(pipe.vae, images, steps=20)
    report = finetune.textual_inversion(pipe, latents, captions, max_steps=40, seconds=1e9)
    vectors = pipe.text_encoder.token_embedding.weight[report["ids"]].detach()
    files["embedding"] = write_embedding(folder / "pink.safetensors", "<pink>", vectors)
    return files


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_trained_lora_matches_diffusers(reference, trained, layout):
    ours = tiny()
    base = image(ours, prompt="a red star on a blue background")
    ours.load_lora(trained[layout])
    reference.load_lora_weights(str(trained[layout]), adapter_name="star")
    try:
        for scale in (1.0, 0.5):
            ours.set_lora_scale(ours.lora_names()[0], scale)
            reference.set_adapters(["star"], adapter_weights=[scale])
            got = image(ours, prompt="a red star on a blue background")
            expected = image(reference, prompt="a red star on a blue background")
            error = float(np.abs(got - expected).max())
            change = float(np.abs(got - base).max())
            print(
                f"trained LoRA, {layout} layout, scale {scale}: image max abs difference "
                f"{error:.1e} (tolerance {TOLERANCE:.0e}); it changes the image by {change:.3f}"
            )
            assert error < TOLERANCE and change > 1e-3
    finally:
        reference.unload_lora_weights()


def test_a_trained_embedding_matches_diffusers(reference, trained):
    ours = tiny()
    assert ours.load_embedding(trained["embedding"]) == "<pink>"
    reference.load_textual_inversion(str(trained["embedding"]))
    prompt = "a <pink> circle on a blue background"
    try:
        expected = image(reference, prompt=prompt)
    finally:
        reference.unload_textual_inversion()
    error = float(np.abs(image(ours, prompt=prompt) - expected).max())
    print(f"trained embedding: image max abs difference {error:.1e} (tolerance {TOLERANCE:.0e})")
    assert error < TOLERANCE


def random_weights(shapes: dict, seed=0) -> dict:
    """Uniform weights of variance about 1 / fan-in (norms near 1, biases small). Each matrix is a
    slice, at its own random offset, of one of a few pools of numbers (one per power of 2 of the
    spread), so SD's 860M parameters take 0.5 GB: 3.4 GB of fresh memory takes 12 s to draw and
    page in on this project's VM hosts, the modules' own initialisation 17 s."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(2**25, generator=generator) * 2 - 1  # [-1, 1): variance 1 / 3
    pools, weights = {}, {}
    for name, tensor in shapes.items():
        if tensor.ndim == 1:
            centre, spread = (1.0, 0.2) if "norm" in name and name.endswith("weight") else (0, 0.1)
            values = torch.rand(tensor.shape, generator=generator) * 2 - 1
            weights[name] = values * spread + centre
            continue
        spread = 2.0 ** round(math.log2((3 / tensor[0].numel()) ** 0.5))
        if spread not in pools:
            pools[spread] = uniform * spread
        start = int(torch.randint(len(uniform) - tensor.numel() + 1, (), generator=generator))
        start -= start % 16  # 64-byte aligned, as oneDNN wants its weights (else it copies them)
        weights[name] = pools[spread][start : start + tensor.numel()].view(tensor.shape)
    return weights


def test_official_size_unet_with_a_lora_matches_diffusers(tmp_path):
    """SD v1's UNet (860M parameters, random weights) with a rank-4 LoRA, alpha 2, on each of its
    128 attention projections, loaded by diffusers from minildm's file: one forward at 32x32."""
    diffusers = oracle("diffusers")
    oracle("peft")
    config = {key: value for key, value in SD_CONFIG.items() if not key.startswith("_")}
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**config)
    weights = random_weights(theirs.state_dict())
    theirs.load_state_dict(weights, assign=True)
    ours = load_unet(config_from_diffusers(SD_CONFIG), weights)  # the same tensors, no copy
    names = attention_projections(ours)
    generator = torch.Generator().manual_seed(0)
    for update in add_lora(ours, names, rank=4, alpha=2.0).values():
        with torch.no_grad():
            down, up = update.down.weight, update.up.weight
            down.copy_(torch.randn(down.shape, generator=generator) / down.shape[1] ** 0.5)
            up.copy_(torch.randn(up.shape, generator=generator) * 0.5)
    path = write_lora(tmp_path / "sd-v1.safetensors", ours, None, adapter="lora")
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        # use_safetensors: without it this call reads the file as a pickle, without the header
        # that holds alpha (the pipeline's load_lora_weights sets it)
        theirs.load_lora_adapter(
            str(path), prefix="unet", adapter_name="lora", use_safetensors=True
        )
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    context = torch.randn(1, 77, 768, generator=generator)
    with torch.no_grad():
        got = ours(sample, torch.tensor([500]), context)
        expected = theirs(sample, torch.tensor([500]), encoder_hidden_states=context).sample
        theirs.disable_adapters()
        base = theirs(sample, torch.tensor([500]), encoder_hidden_states=context).sample
    change = float((got - base).abs().max())
    error = float((got - expected).abs().max())
    adapted = [m.scaling for m in theirs.modules() if hasattr(m, "lora_A")]
    print(
        f"official-size SD v1 UNet, {len(names)} adapted projections, 1x4x32x32: max abs "
        f"difference {error:.1e} (tolerance 1e-4, output scale {expected.abs().max():.2f}); "
        f"the LoRA changes the output by {change:.2f}"
    )
    assert len(names) == len(adapted) == 128 and adapted[0] == {"lora": 0.5}
    assert error < TOLERANCE and change > 0.01


def test_fused_equals_unfused(tmp_path):
    ours = tiny()
    ours.load_lora(lora_file(tmp_path, "kohya", "kohya", alpha=2.0, seed=3), scale=0.7)
    ours.load_lora(lora_file(tmp_path, "diffusers", "attention", seed=4), scale=0.3)
    generator = torch.Generator().manual_seed(0)
    ids = ours.tokenizer(["a red circle on a blue background"])
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        context = ours.text_encoder(ids).repeat(2, 1, 1)
        before = (context, ours.unet(latents, torch.tensor([900, 20]), context))
        ours.fuse_lora()
        after = (
            ours.text_encoder(ids).repeat(2, 1, 1),
            ours.unet(latents, torch.tensor([900, 20]), context),
        )
    assert not lora_layers(ours.unet) and not lora_layers(ours.text_encoder)
    for what, got, expected in zip(("text encoder", "UNet"), after, before, strict=True):
        error = max_relative_error(got, expected)
        print(f"{what}: fused vs unfused max relative error {error:.1e} (tolerance 1e-5)")
        assert error < 1e-5


def test_older_diffusers_spellings_read_as_peft(tmp_path):
    """2023's attention-processor and LoRACompatibleLinear names give the same layers."""
    path = lora_file(tmp_path, "diffusers", "kohya")
    tensors, header = load_file(path), json.loads(read_header(path)["lora_adapter_metadata"])
    older = {}
    for key, tensor in tensors.items():
        part = "down" if ".lora_A." in key else "up"
        module = key.rsplit(".lora_", 1)[0]
        if ".attn" in module and ".to_" in module:  # ...attn1.processor.to_q_lora.down.weight
            attention, projection = module.rsplit(".to_", 1)
            projection = "out" if projection == "out.0" else projection
            older[f"{attention}.processor.to_{projection}_lora.{part}.weight"] = tensor
        elif "self_attn" in module or "mlp" in module:  # q_proj.lora_linear_layer.down.weight
            older[f"{module}.lora_linear_layer.{part}.weight"] = tensor
        else:  # proj_in.lora.down.weight
            older[f"{module}.lora.{part}.weight"] = tensor
    save_file(older, tmp_path / "older.safetensors")
    new, old = read_lora(path), read_lora(tmp_path / "older.safetensors")
    print(f"{len(old.layers)} layers read from 2023 names, {len(new.layers)} from PEFT's")
    assert header["unet.r"] == 4 and new.layers.keys() == old.layers.keys()
    for key, layer in new.layers.items():
        assert torch.equal(layer.down, old.layers[key].down)
        assert torch.equal(layer.up, old.layers[key].up)


def read_header(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# --- Textual inversion --------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2])
def test_embedding_matches_diffusers(reference, tmp_path, count):
    token = f"<shape{count}>"
    ours = tiny()
    table = ours.text_encoder.token_embedding.weight
    generator = torch.Generator().manual_seed(count)
    vectors = table[ours.tokenizer.encode("pink star")[1:3][:count]]  # rows of real words ...
    vectors = vectors + 0.5 * table.std() * torch.randn(vectors.shape, generator=generator)
    path = write_embedding(tmp_path / "learned_embeds.safetensors", token, vectors)
    assert ours.load_embedding(path) == token
    reference.load_textual_inversion(str(path))
    prompt = f"a {token} on a blue background"
    try:
        expected_ids = reference.tokenizer(
            reference.maybe_convert_prompt(prompt, reference.tokenizer),
            padding="max_length",
            max_length=16,
            return_tensors="pt",
        ).input_ids
        expected = image(reference, prompt=prompt)
    finally:
        reference.unload_textual_inversion()
    got_ids = ours.tokenizer([prompt])
    got = image(ours, prompt=prompt)
    error = float(np.abs(got - expected).max())
    print(
        f"embedding of {count} vector(s): ids {got_ids[0, :8].tolist()}; image max abs "
        f"difference {error:.1e} (tolerance 1e-4)"
    )
    assert torch.equal(got_ids, expected_ids) and error < TOLERANCE
    assert got_ids[0].tolist().count(49408) == 1 and (count == 1) == (49409 not in got_ids)


def test_automatic1111_and_kohya_embeddings_give_the_same_vectors(tmp_path):
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors.clone().requires_grad_()},
        "name": "Shiny",
        "step": 500,
        "sd_checkpoint": "4bdfc29c",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(a1111, tmp_path / "shiny-a1111.pt")
    parameters = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({**a1111, "string_to_param": parameters}, tmp_path / "shiny-2022.pt")
    save_file({"emb_params": vectors}, tmp_path / "Shiny.safetensors")
    torch.save({"<shiny>": vectors}, tmp_path / "learned_embeds.bin")
    read = {
        "A1111 .pt": read_embedding(tmp_path / "shiny-a1111.pt"),
        "A1111 .pt of 2022 (ParameterDict)": read_embedding(tmp_path / "shiny-2022.pt"),
        "kohya .safetensors": read_embedding(tmp_path / "Shiny.safetensors"),
        "diffusers .bin": read_embedding(tmp_path / "learned_embeds.bin"),
    }
    for layout, (token, found) in read.items():
        print(f"{layout}: token {token!r}, vectors {tuple(found.shape)}")
        assert torch.equal(found, vectors)
    assert read["A1111 .pt"][0] == "shiny" and read["kohya .safetensors"][0] == "<shiny>"
    assert read_embedding(tmp_path / "shiny-a1111.pt", token="<mine>")[0] == "<mine>"


# --- Refusals -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refusing(tmp_path_factory):
    """One pipeline holding one LoRA ("kept"), which every refusal below must leave as it is:
    (the pipeline, the LoRA's file, the pipeline's state)."""
    kept = lora_file(tmp_path_factory.mktemp("kept"), "kohya", "attention")
    pipe = tiny()
    pipe.load_lora(kept, adapter_name="kept")
    return pipe, kept, state(pipe)


def state(pipe) -> dict:
    """What a refused file must leave as it was."""
    return {
        "loras": pipe.lora_names(),
        "wrapped": len(lora_layers(pipe.unet)) + len(lora_layers(pipe.text_encoder)),
        "tokens": len(pipe.tokenizer),
        "embedding": tuple(pipe.text_encoder.token_embedding.weight.shape),
        "weights": sum(float(p.detach().double().sum()) for p in pipe.unet.parameters()),
        "words": pipe.tokenizer.encode("a pink circle and a <kept>"),
    }


DIFFUSERS_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a 96-wide layer
KOHYA_Q = "lora_unet_" + DIFFUSERS_Q.replace(".", "_")


def lora_tensors(shape_a=(4, 96), shape_b=(96, 4)) -> dict:
    name = f"unet.{DIFFUSERS_Q}"
    return {
        f"{name}.lora_A.weight": torch.ones(shape_a),
        f"{name}.lora_B.weight": torch.ones(shape_b),
    }


def kohya_tensors(name=KOHYA_Q):
    return {
        f"{name}.lora_down.weight": torch.ones(4, 96),
        f"{name}.lora_up.weight": torch.ones(96, 4),
        f"{name}.alpha": torch.tensor(4.0),
    }


REFUSED_LORAS = {  # name: (tensors, header, what the message says)
    "SDXL, kohya's two text encoders": (
        {
            f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{part}": torch.ones(4, 4)
            for part in ("lora_down.weight", "lora_up.weight")
        },
        None,
        "this looks like an SDXL LoRA; minildm implements SD 1.x",
    ),
    "SDXL, kohya's sgm block names": (
        kohya_tensors("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        None,
        "this looks like an SDXL LoRA; minildm implements SD 1.x",
    ),
    "SDXL, diffusers' text_encoder_2": (
        {
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(
                4, 4
            ),
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(
                4, 4
            ),
        },
        None,
        "this looks like an SDXL LoRA; minildm implements SD 1.x",
    ),
    "SDXL, a second transformer block": (
        {
            key.replace("transformer_blocks.0", "transformer_blocks.1"): t
            for key, t in lora_tensors().items()
        },
        None,
        "this looks like an SDXL LoRA; minildm implements SD 1.x",
    ),
    "SDXL, a 2048-wide context": (
        {key.replace("attn1.to_q", "attn2.to_k"): t for key, t in lora_tensors((4, 2048)).items()},
        None,
        "this looks like an SDXL LoRA; minildm implements SD 1.x",
    ),
    "down and up of different ranks": (
        lora_tensors((4, 96), (96, 3)),
        None,
        "of rank 4 but B (96, 3) of rank 3",
    ),
    "a rank other than kohya's declared one": (
        kohya_tensors(),
        {"ss_network_dim": "8", "ss_network_alpha": "4.0"},
        "has rank 4 (A (4, 96), B (96, 4)), but the file declares rank 8 (ss_network_dim)",
    ),
    "a rank other than PEFT's declared one": (
        lora_tensors(),
        {"lora_adapter_metadata": json.dumps({"unet.r": 16, "unet.lora_alpha": 16})},
        "but the file declares rank 16 (r in lora_adapter_metadata)",
    ),
    "a width other than the layer's": (
        lora_tensors((4, 320), (320, 4)),
        None,
        "maps 320 -> 320 channels (A (4, 320), B (320, 4)), but the layer "
        "down.1.attentions.0.block.attn1.q maps 96 -> 96 ((96, 96))",
    ),
    "LoCon's 3x3 convolutions": (
        {
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(4, 64, 3, 3),
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(64, 4, 1, 1),
        },
        None,
        "this is a LoCon / LyCORIS file",
    ),
    "a negative alpha": (
        {**kohya_tensors(), f"{KOHYA_Q}.alpha": torch.tensor(-1.0)},
        None,
        "expected one non-negative number",
    ),
    "an up without its down": (
        {key: t for key, t in lora_tensors().items() if "lora_B" in key},
        None,
        "has its up matrix but no down matrix",
    ),
    "a checkpoint, not a LoRA": (
        {"down_blocks.1.attentions.0.proj_in.weight": torch.ones(96, 96, 1, 1)},
        None,
        "a model's own weights (a checkpoint, not a LoRA)",
    ),
    "DoRA": (
        {**lora_tensors(), f"unet.{DIFFUSERS_Q}.lora_magnitude_vector": torch.ones(96)},
        None,
        "DoRA tensors",
    ),
    "layers of a larger model": (
        {key.replace("down_blocks.1", "down_blocks.0"): t for key, t in lora_tensors().items()},
        None,
        "1 of its layers are not in this unet (unet.down_blocks.0.attentions.0.transformer_blocks"
        ".0.attn1.to_q): the LoRA was made for a model of another architecture",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_LORAS))
def test_a_refused_lora_leaves_the_pipeline_unchanged(refusing, tmp_path, case):
    tensors, header, message = REFUSED_LORAS[case]
    path = tmp_path / "refused.safetensors"
    save_file(tensors, path, metadata=header)
    pipe, _, before = refusing
    with pytest.raises(minildm.CheckpointError) as refusal:
        pipe.load_lora(path)
    print(f"{case}: {refusal.value}")
    assert message in str(refusal.value) and str(path) in str(refusal.value)
    assert state(pipe) == before


def test_damaged_files_and_names_in_use_are_refused(refusing, tmp_path):
    pipe, good, before = refusing
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    for path, load in [
        (truncated, pipe.load_lora),
        (garbage, pipe.load_lora),
        (truncated, pipe.load_embedding),
        (garbage, pipe.load_embedding),
    ]:
        with pytest.raises(minildm.CheckpointError) as refusal:
            load(path)
        message = str(refusal.value)
        print(f"{path.name} ({load.__name__}): {message}")
        assert str(path) in message
        assert "not a complete safetensors file" in message or "not a PyTorch" in message
        assert state(pipe) == before
    for adapter, message in [
        ("kept", "a LoRA called 'kept' is already loaded"),
        ("my.lora", "without dots"),
        ("items", "ModuleDict attribute"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe.load_lora(good, adapter_name=adapter)
        assert state(pipe) == before
    with pytest.raises(ValueError, match="no unfused LoRA called 'other' is loaded"):
        pipe.set_lora_scale("other", 0.5)


REFUSED_EMBEDDINGS = {  # name: (file content, token, what the message says)
    "768 wide, for SD 1.x's text encoder": (
        {"<wide>": torch.ones(768)},
        None,
        "the embedding for '<wide>' is (1, 768), expected (n, 64) for this 64-wide text encoder",
    ),
    "a word the vocabulary has": (
        {"pink": torch.ones(64)},
        None,
        "the token 'pink' is already in the vocabulary",
    ),
    "another word the vocabulary has": (
        {"<x>": torch.ones(64)},
        "circle",
        "the token 'circle' is already in the vocabulary",
    ),
    "several tokens, none chosen": (
        {"<a>": torch.ones(64), "<b>": torch.ones(64)},
        None,
        "holds 2 tokens (<a>, <b>): pass token= to choose",
    ),
    "SDXL's two vectors": (
        {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)},
        None,
        "this looks like an SDXL embedding; minildm implements SD 1.x",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED_EMBEDDINGS))
def test_a_refused_embedding_leaves_the_pipeline_unchanged(refusing, tmp_path, case):
    content, token, message = REFUSED_EMBEDDINGS[case]
    path = tmp_path / "refused.safetensors"
    save_file(content, path)
    pipe, _, before = refusing
    with pytest.raises((ValueError, minildm.CheckpointError)) as refusal:
        pipe.load_embedding(path, token=token)
    print(f"{case}: {refusal.value}")
    assert message in str(refusal.value)
    assert state(pipe) == before


def test_apply_lora_without_a_pipeline(tmp_path):
    """The machinery alone: read once, apply to bare models, written back the same."""
    path = lora_file(tmp_path, "kohya", "kohya", alpha=2.0)
    lora = read_lora(path)
    pipe = tiny()
    adapted = apply_lora(pipe.unet, pipe.text_encoder, lora, scale=1.0, adapter="x")
    counts = {component: len(names) for component, names in adapted.items()}
    print(f"kohya's layers adapted: {counts}")
    # 7 spatial transformers (2 down, 1 mid, 4 up) of 12 layers; 2 text-encoder layers of 6
    assert counts == {"unet": 7 * 12, "text_encoder": 2 * 6}
    assert all(isinstance(layer, LoRALayer) for layer in lora_layers(pipe.unet).values())
    again = read_lora(
        write_lora(tmp_path / "again.safetensors", pipe.unet, pipe.text_encoder, "x", "kohya")
    )
    assert again.layers.keys() == lora.layers.keys()
    for key, layer in lora.layers.items():
        assert torch.equal(again.layers[key].up, layer.up) and again.layers[key].alpha == 2.0


def test_kohya_alpha_missing_or_zero_means_rank(tmp_path):
    """sd-scripts' LoRAModule: "if alpha == 0 or None, alpha is rank" (diffusers reads 0 as 0)."""
    tensors = kohya_tensors()
    found = {}
    for case, alpha in (("missing", None), ("zero", 0.0), ("two", 2.0)):
        path = tmp_path / f"{case}.safetensors"
        chosen = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
        if alpha is not None:
            chosen[f"{KOHYA_Q}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        save_file(chosen, path)
        (layer,) = read_lora(path).layers.values()
        found[case] = layer.alpha
    print(f"alpha read for a rank-4 layer: {found}")
    assert found == {"missing": 4.0, "zero": 4.0, "two": 2.0}
