"""Fine-tuning a trained text-to-image model on a few pictures, on a CPU in minutes: textual
inversion (a new word, minildm/textual_inversion.py) and LoRA (low-rank updates of the attention
projections, minildm/lora.py). Both lower the loss that trained the model (Ho et al. 2020,
arXiv:2006.11239, eq. 14) with the model frozen and only the new parameters learning:

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,     loss = || eps - unet(x_t, t, text) ||^2

Three things matter on the tiny SD and the shapes world (minildm/shapes.py):

- The latents. Fine-tuning learns from the pictures' latents, as training did: the encoder's
  posterior means (`encoder_latents`). That asks of the autoencoder that it encode and decode what
  it never saw with a caption; SD's learned OpenImages, far wider than its captions, and the tiny
  SD's first stage learns other colours and outlines beside the world (shapes.other_drawing) for
  the same reason. Where the encoder still misreads a picture (a star comes back round),
  `fit_latents` inverts the decoder instead: start from the encoder's guess and descend
  || decode(z) - x ||^2 in z.
- Textual inversion starts the new vector from a word near the concept (Gal et al. 2022,
  arXiv:2208.01618, section 4: "initialized with ... a single-word coarse descriptor"): "<pink>"
  starts as "red". Only that row of the embedding table learns.
- LoRA keeps what the model knew by prior preservation (Ruiz et al. 2022, "DreamBooth",
  arXiv:2208.12242, eq. 2): half of each batch is drawn from the world the model was trained on,
  with its own captions, so the updates learn "star" without unlearning "circle"; and 10% of the
  captions are empty, as in training, because classifier-free guidance subtracts the prediction
  without text, which the updates change too (without it, guided samples fell apart into blobs).

What the frozen autoencoder allows is the limit of both, measured (docs/fine-tuning.md): it
brings pink back pink (0.94 of drawings) but a star back round, and the latents its decoder paints
a star from are unlike those the UNet learned from, a hard target for a LoRA on the attention
projections.

`world_examples` gives the drawings and captions of a world extension ("pink", "star");
`finetune_scores` scores a pipeline on what fine-tuning never saw.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

from minildm import shapes
from minildm.lora import add_lora, attention_projections
from minildm.textual_inversion import add_placeholder
from minildm.train.evaluate import generate
from minildm.train.loop import learning_rate, to_model_input

# --- the data -------------------------------------------------------------------------------------

WORLDS = ("pink", "star")
PINK_TOKEN = "<pink>"


def world_examples(world: str, count: int, seed: int = 0):
    """`count` drawings of a world extension and their captions, never from its held-out set:
    pink shapes ("a <pink> square on a gray background", the colour named by the placeholder)
    or stars ("a red star on the left side of a blue background"). -> (images (N, 64, 64, 3)
    uint8, captions, scenes). Every (triple, position) is drawn once before any twice."""
    if world == "pink":
        held_out = {("pink", s, b) for s, b in shapes.PINK_HELD_OUT}
        triples = [t for t in shapes.extended_triples() if t[0] == "pink" and t[1] != "star"]
    elif world == "star":
        held_out = set(shapes.STAR_HELD_OUT)
        triples = [t for t in shapes.extended_triples() if t[1] == "star" and t[0] != "pink"]
    else:
        raise ValueError(f"unknown world {world!r}: expected one of {', '.join(WORLDS)}")
    triples = [t for t in triples if t not in held_out]
    rng = np.random.default_rng(seed)
    cells = [(t, p) for t in triples for p in shapes.POSITIONS]
    order = np.concatenate([rng.permutation(len(cells)) for _ in range(-(-count // len(cells)))])
    scenes = []
    for index in order[:count]:
        triple, position = cells[index]
        scene = shapes.sample_scene(rng, [triple])
        scene.update(position=position, cx=shapes.POSITIONS[position] + rng.uniform(-2, 2))
        scenes.append(scene)
    images = np.stack([shapes.draw_scene(s) for s in scenes])
    named = PINK_TOKEN if world == "pink" else None
    captions = [
        shapes.caption(named or s["colour"], s["shape"], s["background"], s["position"])
        for s in scenes
    ]
    return images, captions, scenes


def fit_latents(
    vae, images: np.ndarray, steps: int = 100, lr: float = 0.1, anchor: float = 0.0
) -> torch.Tensor:
    """Latents that the decoder turns into `images` (N, 64, 64, 3) uint8: the encoder's means,
    then `steps` of Adam on the squared pixel error of decode(z), plus `anchor` times the squared
    distance to the encoder's latents (0: none; larger keeps z nearer latents the UNet knows, and
    draws the picture less faithfully). -> (N, 4, 8, 8), scaled by the autoencoder's scaling
    factor as the UNet sees them."""
    x = to_model_input(torch.from_numpy(images))  # (N, 3, 64, 64) in [-1, 1], channels-last
    with torch.no_grad():
        z, _ = vae.encode(x)  # (N, 4, 8, 8)
    # channels-last, as the decoder's convolutions run fastest on a CPU (train/loop.py)
    z = z.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    start = z.detach().clone()
    frozen = [p.requires_grad for p in vae.parameters()]
    vae.requires_grad_(False)
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(vae.decode(z), x) + anchor * F.mse_loss(z, start)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p, wanted in zip(vae.parameters(), frozen, strict=True):
        p.requires_grad_(wanted)
    return z.detach() * vae.config.scaling_factor


def encoder_latents(vae, images: np.ndarray) -> torch.Tensor:
    """The latents training learned from (train/loop.py): the encoder's posterior means of
    `images` (N, 64, 64, 3) uint8, scaled by the autoencoder's scaling factor. -> (N, 4, 8, 8)"""
    with torch.no_grad():
        mean, _ = vae.encode(to_model_input(torch.from_numpy(images)))
    return mean * vae.config.scaling_factor


# --- the loop -------------------------------------------------------------------------------------


def noise_prediction_loss(pipe, latents, ids, alphas_cumprod, generator):
    """eq. 14 on one batch of latents (B, 4, 8, 8) and caption ids (B, L)."""
    B = len(latents)
    t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    a = alphas_cumprod[t].view(B, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # eq. 4
    return F.mse_loss(pipe.unet(noisy, t, pipe.text_encoder(ids)), noise)


def optimise(params, batch_loss, seconds: float, lr: float, max_steps: int | None, seed: int):
    """AdamW on `params` for `seconds` (or `max_steps`), the learning rate warmed up over 20 steps
    then cosine-decayed over the time (train/loop.py's schedule). -> the losses, one per step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or (max_steps is not None and step >= max_steps):
            break
        fraction = elapsed / seconds if max_steps is None else step / max_steps
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, fraction, step, warmup_steps=20)
        loss = batch_loss(generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
    return losses


def frozen(pipe):
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)


def textual_inversion(
    pipe,
    latents: torch.Tensor,
    captions: list,
    token: str = PINK_TOKEN,
    init_word: str = "red",
    vectors: int = 1,
    seconds: float = 120.0,
    max_steps: int | None = None,
    batch: int = 16,
    lr: float = 0.1,
    seed: int = 0,
) -> dict:
    """Teach `pipe` the placeholder `token` from pictures' `latents` (N, 4, 8, 8) (encoder_latents)
    and their `captions` (which use the token), for `seconds` (or `max_steps`). The placeholder
    is added to pipe's tokenizer and text encoder; -> a report with its ids, the losses, the
    steps and seconds."""
    start = time.perf_counter()
    frozen(pipe)
    init_ids = pipe.tokenizer.encode(init_word)[1:-1]
    if len(init_ids) != 1:
        raise ValueError(f"init_word {init_word!r} must be one token, got {len(init_ids)}")
    init = pipe.text_encoder.token_embedding.weight[init_ids[0]].detach()
    ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, token, init.repeat(vectors, 1))
    table = pipe.text_encoder.token_embedding.weight  # (V + n, D)
    table.requires_grad_(True)
    learns = torch.zeros(len(table), 1)
    learns[ids] = 1.0
    hook = table.register_hook(lambda grad: grad * learns)  # only the placeholder's rows move
    caption_ids = pipe.tokenizer(captions)  # (N, L)
    alphas_cumprod = pipe.scheduler.alphas_cumprod

    def batch_loss(generator):
        index = torch.randint(len(latents), (batch,), generator=generator)
        return noise_prediction_loss(
            pipe, latents[index], caption_ids[index], alphas_cumprod, generator
        )

    # Adam moves only rows with a gradient: the other rows' moments stay zero
    losses = optimise([table], batch_loss, seconds, lr, max_steps, seed)
    hook.remove()  # later training of the text encoder gets whole gradients again
    table.requires_grad_(False)
    return dict(
        token=token,
        ids=ids,
        losses=losses,
        steps=len(losses),
        seconds=time.perf_counter() - start,
    )


def lora_finetune(
    pipe,
    latents: torch.Tensor,
    captions: list,
    rank: int = 4,
    alpha: float | None = None,
    text_encoder: bool = True,
    seconds: float = 240.0,
    max_steps: int | None = None,
    batch: int = 32,
    prior_share: float = 0.5,
    caption_dropout: float = 0.1,
    lr: float = 2e-3,
    seed: int = 0,
    adapter: str = "lora",
) -> dict:
    """Train rank-`rank` updates of the attention projections of pipe's UNet (and text encoder)
    on pictures' `latents` (encoder_latents) and their `captions`, with `prior_share` of each batch
    drawn from the world the model already knows, for `seconds` (or `max_steps`). The updates
    stay in pipe, unfused; -> a report as textual_inversion's."""
    start = time.perf_counter()
    frozen(pipe)
    prior_images, prior_scenes = shapes.make_dataset(len(latents), seed + 1)
    with torch.no_grad():
        prior_mean, _ = pipe.vae.encode(to_model_input(torch.from_numpy(prior_images)))
    prior_latents = prior_mean * pipe.vae.config.scaling_factor
    prior_captions = [
        shapes.caption(s["colour"], s["shape"], s["background"], s["position"])
        for s in prior_scenes
    ]
    updates = add_lora(pipe.unet, attention_projections(pipe.unet), rank, alpha, adapter)
    if text_encoder:
        updates.update(
            add_lora(
                pipe.text_encoder, attention_projections(pipe.text_encoder), rank, alpha, adapter
            )
        )
    params = [p for update in updates.values() for p in update.parameters()]
    all_latents = torch.cat([latents, prior_latents])
    all_ids = pipe.tokenizer(captions + prior_captions)
    empty_ids = pipe.tokenizer([""])[0]
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    new_count = len(latents)
    prior_batch = int(round(batch * prior_share))

    def batch_loss(generator):
        new = torch.randint(new_count, (batch - prior_batch,), generator=generator)
        prior = new_count + torch.randint(len(prior_latents), (prior_batch,), generator=generator)
        index = torch.cat([new, prior])
        ids = all_ids[index]  # (B, L)
        # the empty caption for 10%, as in the base model's training: classifier-free guidance
        # subtracts the prediction without text, which the updates change too (train/loop.py)
        empty = torch.rand(batch, generator=generator) < caption_dropout
        ids[empty] = empty_ids
        return noise_prediction_loss(pipe, all_latents[index], ids, alphas_cumprod, generator)

    losses = optimise(params, batch_loss, seconds, lr, max_steps, seed)
    for p in params:
        p.requires_grad_(False)
    return dict(
        adapter=adapter,
        rank=rank,
        parameters=sum(p.numel() for p in params),
        losses=losses,
        steps=len(losses),
        seconds=time.perf_counter() - start,
    )


# --- scores -----------------------------------------------------------------------------------


def finetune_scores(pipe, triples: list, colour_word=None, seeds=(0, 1), steps=25, guidance=4.0):
    """Generate each (colour, shape, background) triple in the three positions with each seed and
    score them with the extended scorer; `colour_word` replaces the colour in the prompt ("<pink>"
    for pink). -> the scorer's fractions."""
    scenes = [
        dict(colour=c, shape=s, background=b, position=p)
        for c, s, b in triples
        for p in shapes.POSITIONS
    ]
    prompts = [
        shapes.caption(colour_word or s["colour"], s["shape"], s["background"], s["position"])
        for s in scenes
    ]
    images = np.concatenate([generate(pipe, prompts, seed, steps, guidance) for seed in seeds])
    return shapes.score(images, scenes * len(seeds), extended=True)


def pink_held_out() -> list:
    return [("pink", s, b) for s, b in shapes.PINK_HELD_OUT]
