"""Fine-tuning from the command line (minildm/tools/finetune.py, train/finetune.py) and using its
files (`sd --lora`, `sd --embedding`): arguments refused before anything loads, a short run on a
folder of pictures that writes a file the pipeline and diffusers' layout read, and the command
line's images equal to the pipeline's with the same files."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

import minildm
from minildm import shapes
from minildm.__main__ import main
from minildm.checkpoints.embeddings import read_embedding, write_embedding
from minildm.checkpoints.lora import read_lora
from minildm.train import finetune


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the pipeline was loaded before the arguments were checked")


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["textual-inversion", "--world", "star"], "cannot teach a shape"),
        (["lora", "--out", "{tmp}/x.pt"], "NAME.safetensors"),
        (["lora", "--out", "{tmp}/exists.safetensors"], "exists"),
        (["lora", "--out", "{tmp}/no/such/folder/x.safetensors"], "does not exist"),
        (["lora", "--minutes", "0"], "--minutes must lie in"),
        (["lora", "--rank", "0"], "--rank must lie in"),
        (["lora", "--world", "star", "--images", "{tmp}"], "not both"),
        (["lora", "--images", "{tmp}/nowhere"], "not a folder"),
        (["lora", "--caption", "a red star"], "--caption goes with --images"),
        (
            ["textual-inversion", "--images", "{tmp}", "--caption", "a pink circle"],
            "does not hold the placeholder",
        ),
        (["lora", "--weights", "{tmp}/nowhere"], "not a pipeline folder"),
        # an option of the other method is refused, not ignored
        (["textual-inversion", "--rank", "8"], "--rank does not go with textual-inversion"),
        (["lora", "--token", "<x>", "--init-word", "red"], "--token, --init-word does not go"),
        (["textual-inversion", "--token", "<x>"], "--token goes with --images"),
    ],
)
def test_finetune_arguments_are_refused_before_loading(arguments, words, monkeypatch, tmp_path):
    monkeypatch.setattr(minildm.StableDiffusionPipeline, "from_pretrained", refuse_to_load)
    (tmp_path / "exists.safetensors").write_bytes(b"")
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "new.safetensors")]
    with pytest.raises(SystemExit) as raised:
        main(["finetune", *arguments])
    print(raised.value)
    assert str(raised.value).startswith("error: ") and words in str(raised.value)


def star_pictures(folder, count: int):
    """`count` star drawings in `folder`, each with its caption in NAME.txt."""
    images, captions, _ = finetune.world_examples("star", count, seed=3)
    folder.mkdir()
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(image).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def test_a_short_lora_run_on_a_folder_writes_a_file_the_pipeline_reads(tmp_path, capsys):
    pictures = star_pictures(tmp_path / "stars", 4)
    out = tmp_path / "star.safetensors"
    main(["finetune", "lora", "--images", str(pictures), "--minutes", "0.4", "--out", str(out)])
    printed = capsys.readouterr().out
    print(printed)
    assert "4 pictures" in printed and "trained" in printed
    lora = read_lora(out)
    assert lora.layout == "diffusers"
    components = {component for component, _ in lora.layers}
    assert components == {"unet", "text_encoder"}
    assert all(layer.rank == 4 for layer in lora.layers.values())
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    call = dict(height=64, width=64, num_inference_steps=5, output_type="np")
    call.update(generator=torch.Generator().manual_seed(0))
    before = pipe("a red star on a blue background", **call).images
    pipe.load_lora(out)
    call.update(generator=torch.Generator().manual_seed(0))
    after = pipe("a red star on a blue background", **call).images
    change = np.abs(after - before).max()
    print(f"the LoRA changes the image by {change:.3f}")
    assert change > 1e-3  # B moved away from zero: the updates learned something


def test_a_run_with_no_time_left_after_encoding_is_refused(tmp_path, monkeypatch):
    """--minutes covers the encoding too; when it takes them all, no step would run and the file
    would hold the untrained start: refused, nothing written."""
    pictures = star_pictures(tmp_path / "stars", 2)
    encode = finetune.encoder_latents

    def slow_encoder_latents(vae, images):
        time.sleep(6.5)  # more than --minutes 0.1
        return encode(vae, images)

    monkeypatch.setattr(finetune, "encoder_latents", slow_encoder_latents)
    out = tmp_path / "star.safetensors"
    with pytest.raises(SystemExit) as raised:
        main(["finetune", "lora", "--images", str(pictures), "--minutes", "0.1",
              "--out", str(out)])  # fmt: skip
    print(raised.value)
    assert "leaving none to train" in str(raised.value) and not out.exists()


def test_a_short_textual_inversion_run_adds_the_token(tmp_path, capsys):
    images, captions, _ = finetune.world_examples("pink", 4, seed=3)
    folder = tmp_path / "pink"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "pink.safetensors"
    caption = "a <pink> circle"
    main(["finetune", "textual-inversion", "--images", str(folder), "--caption", caption,
          "--minutes", "0.3", "--out", str(out)])  # fmt: skip
    print(capsys.readouterr().out)
    token, vectors = read_embedding(out)
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    red = pipe.text_encoder.token_embedding.weight[pipe.tokenizer.encode("red")[1]]
    moved = (vectors[0] - red).norm().item()
    print(f"token {token!r}, vectors {tuple(vectors.shape)}, moved {moved:.4f} from 'red'")
    assert token == "<pink>" and vectors.shape == (1, 64)
    assert moved > 1e-4  # it started as "red" and learned


def test_sd_with_lora_and_embedding_equals_the_pipeline(tmp_path, capsys):
    """The command line's --lora FILE:SCALE and --embedding FILE give the pipeline's image."""
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    lora = minildm.lora.add_lora(pipe.unet, minildm.lora.attention_projections(pipe.unet), 2)
    generator = torch.Generator().manual_seed(1)
    for update in lora.values():
        torch.nn.init.normal_(update.up.weight, std=0.05, generator=generator)
    from minildm.checkpoints.lora import write_lora

    write_lora(tmp_path / "random.safetensors", pipe.unet, None)
    minildm.lora.remove_lora(pipe.unet)
    vector = torch.randn(1, 64, generator=generator) * 0.3
    write_embedding(tmp_path / "thing.safetensors", "<thing>", vector)
    prompt = "a <thing> circle on a blue background"
    out = tmp_path / "out"
    main(["sd", prompt, "--lora", f"{tmp_path / 'random.safetensors'}:0.5",
          "--embedding", str(tmp_path / "thing.safetensors"), "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr()
    print(printed.out)
    assert "at scale 0.5" in printed.out
    [written] = [p for p in out.glob("*.png")]
    pipe.load_embedding(tmp_path / "thing.safetensors")
    pipe.load_lora(tmp_path / "random.safetensors", scale=0.5)
    expected = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=25,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    difference = np.abs(
        np.asarray(Image.open(written), dtype=int) - np.asarray(expected, dtype=int)
    )
    print(f"command line vs pipeline: {difference.max()} of 255")
    assert difference.max() <= 1
    # "<thing>" is the prompt's one word outside the world's: an --embedding's token warns not
    assert "never saw" not in printed.err


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--lora", "{tmp}/missing.safetensors", "no such file"),
        ("--lora", "{tmp}/garbage.safetensors:0.5", "garbage.safetensors"),
        ("--lora", "{tmp}/garbage.safetensors:inf", "finite"),
        ("--embedding", "{tmp}/missing.pt:<x>", "no such file"),
        ("--embedding", "{tmp}/garbage.safetensors", "garbage.safetensors"),
    ],
)
def test_sd_refuses_bad_files_before_loading(option, value, words, monkeypatch, tmp_path):
    from minildm.tools import generate

    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    value = value.replace("{tmp}", str(tmp_path))
    with pytest.raises(SystemExit) as raised:
        main(["sd", "a red circle", option, value, "--out", str(tmp_path / "out")])
    print(raised.value)
    assert str(raised.value).startswith("error: ") and words in str(raised.value)


def test_world_examples_never_show_the_held_out_set():
    _, captions, scenes = finetune.world_examples("pink", 64)
    pairs = {(s["shape"], s["background"]) for s in scenes}
    assert not pairs & set(shapes.PINK_HELD_OUT) and all("<pink>" in c for c in captions)
    _, _, scenes = finetune.world_examples("star", 96)
    triples = {(s["colour"], s["shape"], s["background"]) for s in scenes}
    assert not triples & set(shapes.STAR_HELD_OUT) and {s["shape"] for s in scenes} == {"star"}
    print(f"pink: {len(pairs)} (shape, background) pairs; star: {len(triples)} triples")
