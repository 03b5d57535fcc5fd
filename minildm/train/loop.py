"""The training loop of minildm, read top to bottom: one loop trains every model, and what
differs per system is the loss it lowers (start here; train/run.py runs the stages in order).

Every system is latent diffusion in two stages (Rombach et al. 2022, arXiv:2112.10752, section 3):
an autoencoder learns to compress 64x64x3 drawings into an 8x8 latent grid, the training set is
encoded once, and a denoising model learns on the cached latents. In this file:

- the small parts: the learning rate (a linear warm-up, then a cosine to 5% of its peak over the
  stage's time), the model input, a progress line, the exponential moving average of the weights
  (the shipped weights are the average, Ho et al. 2020, arXiv:2006.11239, appendix B), and an
  atomic checkpoint;
- `train_stage`: AdamW on one `batch_loss(generator)`, resumable from its checkpoint;
- the losses. The KL autoencoder: L1 + squared pixel loss + a 1e-6 KL term towards N(0, I), the
  paper's "KL-reg" (section 3.1, weight as in CompVis/latent-diffusion
  `configs/autoencoder/*kl*.yaml`); SD's GAN and LPIPS terms are left out: on flat synthetic shapes
  a pixel loss is enough, and each would double the step time. The VQ autoencoder: the VQ-VAE
  losses (van den Oord et al. 2017, arXiv:1711.00937, eq. 3) with random restarts of dead codes.
  The denoising UNets (sd, ldm, ldm-uncond): the simplified DDPM objective (Ho et al. 2020, eq. 14)

      x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,     loss = || eps - unet(x_t, t, text) ||^2

  VQ-Diffusion (Gu et al. 2022, arXiv:2111.14822): the code indices corrupted by the
  mask-and-replace forward process, and a transformer trained to predict the clean codes with the
  variational bound plus the auxiliary x0 loss (section 3.2 and appendix); its text encoder is
  frozen, as VQ-Diffusion freezes CLIP.

Captions: 10% of training images get the empty caption (or VQ-Diffusion's learned embedding, from
Improved VQ-Diffusion, Tang et al. 2022, arXiv:2205.16007) so the same model also predicts without
text, which classifier-free guidance needs (Ho & Salimans 2022, arXiv:2207.12598, section 3.2);
10% more get the caption without its background.
"""

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minildm.autoencoder import AutoencoderKL
from minildm.checkpoints.files import write_file
from minildm.schedulers import DDIMScheduler, VQDiffusionScheduler
from minildm.train import distributed
from minildm.train.distributed import share
from minildm.train.recipes import VQ_SCHEDULER_CONFIG, Settings

# --- small parts ----------------------------------------------------------------------------------


def learning_rate(peak: float, fraction: float, step: int, warmup_steps: int = 100) -> float:
    """Linear warm-up over the first steps, then a cosine from peak to 5% of it as time runs out."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0))))


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], channels_last (faster convolutions on
    CPU)."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous(memory_format=torch.channels_last)


class Progress:
    """One line every `every` seconds: step, loss, images per second, time left in the stage."""

    def __init__(self, stage: str, budget_s: float, batch: int, every: float):
        self.stage, self.budget_s, self.batch, self.every = stage, budget_s, batch, every
        self.last_print, self.last_step, self.losses = time.perf_counter(), 0, []

    def update(self, step: int, loss: float, elapsed_s: float, lr: float):
        self.losses.append(loss)
        now = time.perf_counter()
        if now - self.last_print >= self.every and distributed.is_main():
            rate = (step - self.last_step) * self.batch / (now - self.last_print)
            left = max(self.budget_s - elapsed_s, 0)
            print(
                f"{self.stage} step {step:6d} | loss {np.mean(self.losses[-50:]):.4f} | "
                f"{rate:6.1f} img/s | lr {lr:.2e} | {left / 60:5.1f} min left",
                flush=True,
            )
            self.last_print, self.last_step = now, step


def ema_update(ema: list, params: list, decay: float):
    """ema <- decay * ema + (1 - decay) * params, in place."""
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - decay)


@contextmanager
def averaged_weights(params: list, ema: list | None):
    """Inside: the parameters hold their moving average (if one is kept); after: their own values."""
    if ema is None:
        yield
        return
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, ema)
        try:
            yield
        finally:
            torch._foreach_copy_(params, own)


def save_checkpoint(out: Path, state: dict):
    """Atomically: a crash while writing leaves the previous checkpoint intact."""
    write_file(out / "checkpoint.pt", lambda temporary: torch.save(state, temporary))


# --- the one training loop ------------------------------------------------------------------------


def train_stage(
    stage: str,
    models: dict,
    batch_loss,
    run: dict,
    *,
    lr: float,
    batch: int,
    budget_s: float,
    seed: int,
    ema_decay: float | None = None,
    clip_norm: float | None = None,
    max_steps: int | None = None,
    timeline=None,
):
    """Train `models` ({name: module}) to lower `batch_loss(generator)` for `budget_s` seconds
    (or `max_steps` steps, if that comes first: --quick runs count steps, so that what they learn
    does not depend on how busy the machine is).

    AdamW, warm-up then cosine learning rate over the stage's time, optionally gradient clipping
    and an exponential moving average of the weights (which the models hold at the end). All
    randomness of the stage comes from one generator seeded `seed`, so a stage is a function of its
    seed. Progress is kept in run["state"][stage] and checkpointed every few minutes; a resumed
    run continues from there, and a finished stage only loads its weights.

    `timeline` (train/timeline.py), if given, records a point from the averaged weights whenever
    one is due and when the stage ends; its time is not counted in the stage's.

    Under torchrun (train/distributed.py) each rank computes its share of every batch and the
    gradients are averaged; rank 0's clock decides, and only rank 0 writes the checkpoint.
    """
    settings, state, out, history = run["settings"], run["state"], run["out"], run["history"]
    saved = state.get(stage, {})
    if saved.get("done"):
        for name, module in models.items():
            module.load_state_dict(saved["models"][name])
            module.eval()
        return
    params = [p for module in models.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    ema = [p.detach().clone() for p in params] if ema_decay else None
    step = 0
    elapsed_s = 0.0
    if saved:
        for name, module in models.items():
            module.load_state_dict(saved["models"][name])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["rng"])
        ema = [t.clone() for t in saved["ema"]] if ema_decay else None
        step = saved["step"]
        elapsed_s = saved["seconds"]
    batch_loss = distributed.averaged_gradients(models, batch_loss)  # one process: unchanged
    history.setdefault(f"{stage}_loss", [])

    def snapshot(done: bool) -> dict:
        entry = {
            "models": {name: module.state_dict() for name, module in models.items()},
            "step": step,
            "seconds": elapsed_s,
            "done": done,
        }
        if not done:
            entry.update(optimizer=optimizer.state_dict(), rng=generator.get_state())
            if ema_decay:
                entry["ema"] = ema
        return entry

    if timeline is not None:
        timeline.forget_after(step)  # points recorded after the checkpoint we resume from

    def record_timeline(lr: float):
        with averaged_weights(params, ema):
            for module in models.values():
                module.eval()
            timeline.record(step, elapsed_s, lr)
            for module in models.values():
                module.train()

    for module in models.values():
        module.train()
    progress = Progress(stage, budget_s, batch, every=10 if settings.quick else 30)
    world = distributed.world_size()
    last_checkpoint = time.perf_counter()
    while elapsed_s < budget_s and (max_steps is None or step < max_steps):
        progress_fraction = elapsed_s / budget_s
        if max_steps is not None:
            progress_fraction = max(progress_fraction, step / max_steps)
        current_lr = learning_rate(lr, progress_fraction, step)
        if timeline is not None and timeline.due(elapsed_s):
            record_timeline(current_lr)
        started = time.perf_counter()
        loss = batch_loss(generator)
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        step += 1
        if ema_decay:  # a short memory early (the weights change fast), the full decay later
            ema_update(ema, params, min(ema_decay, (1 + step) / (10 + step)))
        elapsed_s += distributed.agreed(time.perf_counter() - started)
        batch_mean = distributed.total(loss.detach().clone()) / world  # of the ranks' shares
        progress.update(step, float(batch_mean), elapsed_s, current_lr)
        if step % 10 == 0:
            history[f"{stage}_loss"].append((step, float(np.mean(progress.losses[-10:]))))
        if time.perf_counter() - last_checkpoint > settings.checkpoint_every:
            state[stage] = snapshot(done=False)
            state["history"] = json.dumps(history)
            if distributed.is_main():
                save_checkpoint(out, state)
            last_checkpoint = time.perf_counter()
    if ema_decay:  # the shipped weights are the average
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    for module in models.values():
        module.eval()
    if timeline is not None:
        if not timeline.points or timeline.points[-1]["step"] != step:
            final_lr = learning_rate(lr, min(elapsed_s / budget_s, 1.0), step)
            timeline.record(step, elapsed_s, final_lr)
        timeline.finish()
    state[stage] = snapshot(done=True)
    state["history"] = json.dumps(history)
    if distributed.is_main():
        save_checkpoint(out, state)
        print(f"{stage}: {step} steps in {elapsed_s / 60:.1f} min", flush=True)


# --- the losses: what differs per system ----------------------------------------------------------


def random_images(images: torch.Tensor, batch: int, generator) -> torch.Tensor:
    """A batch of training drawings, half of them mirrored left-right (still scenes of the
    world)."""
    index = torch.randint(len(images), (batch,), generator=generator)
    x = to_model_input(images[index])  # (B, 3, 64, 64)
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    return x


def start_nearly_deterministic(vae: AutoencoderKL) -> AutoencoderKL:
    """A fresh AutoencoderKL's posterior made narrow before training. With the default init its std
    is about 1, as large as the mean, and the 1e-6 KL weight leaves the log-variance to fall by itself
    over thousands of steps while the noise hides every detail from the decoder (measured: std 0.68
    against a mean spread of 2.8 after 424 steps). A log-variance bias of -6 gives std 0.05 from the
    first step."""
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[latent:].fill_(-6.0)  # the second half of quant_conv: the log-variance
    return vae


def kl_autoencoder_loss(vae, images: torch.Tensor, settings: Settings):
    """Reconstruction (L1 + squared) + KL for AutoencoderKL; leaves `vae` as it is."""

    def loss(generator):
        x = share(random_images(images, settings.vae_batch, generator))  # this process's share
        mean, logvar = vae.encode(x)  # each (B, 4, 8, 8)
        noise = share(torch.randn((settings.vae_batch, *mean.shape[1:]), generator=generator))
        reconstruction = vae.decode(mean + torch.exp(0.5 * logvar) * noise)  # reparameterised
        # KL(N(mean, var) || N(0, 1)) summed over the latent, averaged over the batch (as in
        # CompVis' DiagonalGaussianDistribution.kl); L1 averaged over pixels
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        # L1 keeps flat colours exact; the squared error adds a stronger pull on large colour errors
        pixels = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        return pixels + settings.kl_weight * kl

    return loss


def vq_autoencoder_loss(vq, images: torch.Tensor, settings: Settings, fresh: bool):
    """Reconstruction (L1 + squared) + the VQ-VAE codebook and commitment terms (van den Oord et al.
    2017, eq. 3): ||sg[h] - e||^2 + beta ||h - sg[e]||^2, with the straight-through gradient
    (the decoder's gradient passed to the encoder as if quantization were the identity)."""
    usage = torch.zeros(vq.config.codebook_size)
    steps = [0 if fresh else 1]

    def loss(generator):
        x = share(random_images(images, settings.vae_batch, generator))  # this process's share
        h = vq.encode(x)  # (B, D, 8, 8), before quantization
        if steps[0] % 100 == 0:
            whole = distributed.gather(h.detach())  # the whole batch's latents (one process: h)
        if steps[0] == 0:  # codes start as encoder outputs, not as N(0, 1) far from every latent
            _restart_codes(vq, whole, torch.ones_like(usage, dtype=torch.bool), generator)
        elif steps[0] % 100 == 0:
            # Codes no latent chose for 100 steps get no gradient and stay dead; restart them at
            # random latents of this batch (the "random restart" of Dhariwal et al. 2020, Jukebox).
            dead = distributed.total(usage) == 0  # (under torchrun: chosen by no process)
            _restart_codes(vq, whole, dead, generator)
            usage.zero_()
        steps[0] += 1
        e, indices = vq.quantize(h)  # nearest codes (B, D, 8, 8), their indices (B, 8, 8)
        usage.index_add_(0, indices.flatten(), torch.ones(indices.numel()))
        reconstruction = vq.decode(h + (e - h).detach(), quantize=False)  # straight through
        pixels = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        codebook = F.mse_loss(e, h.detach())
        commitment = F.mse_loss(h, e.detach())
        return pixels + codebook + settings.commitment_weight * commitment

    return loss


def _restart_codes(vq, h: torch.Tensor, dead: torch.Tensor, generator):
    """Set the `dead` codebook rows to randomly chosen latent vectors of h (B, D, h, w)."""
    count = int(dead.sum())
    if count == 0:
        return
    vectors = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*h*w, D)
    chosen = vectors[torch.randint(len(vectors), (count,), generator=generator)]
    with torch.no_grad():
        vq.codebook.weight[dead] = chosen


def choose_captions(captions: torch.Tensor, index, settings: Settings, generator):
    """Token ids (B, L) for the images `index`: 0 the full caption (u above both thresholds), 1 the
    caption without background, 2 the empty one. -> (ids, which) with which (B,) in {0, 1, 2}."""
    u = torch.rand(len(index), generator=generator)
    without_background = u < settings.caption_dropout + settings.background_dropout
    empty = u < settings.caption_dropout
    which = without_background.long() + empty.long()
    return captions[index, which], which


def epsilon_loss(unet, text_encoder, latents, captions, schedule: dict, settings: Settings):
    """The simplified DDPM objective (Ho et al. 2020, eq. 14) on cached latents.

    latents: (mean, std, scale) of each image's posterior (KL autoencoders: a fresh sample each
    time; std 0 for a VQ autoencoder's deterministic latents). text_encoder and captions are None
    for an unconditional UNet.
    """
    means, stds, scale = latents
    alphas_cumprod = DDIMScheduler(**schedule).alphas_cumprod  # (1000,) float32

    def loss(generator):
        B = settings.unet_batch
        index = torch.randint(len(means), (B,), generator=generator)
        if text_encoder is not None:
            ids, _ = choose_captions(captions, index, settings, generator)  # (B, L)
        # a fresh sample of each image's posterior, scaled to unit variance as SD's latents are
        posterior_noise = torch.randn(means[index].shape, generator=generator)
        x0 = (means[index] + stds[index] * posterior_noise) * scale  # (B, 4, 8, 8)
        t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(B, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise  # Ho et al. 2020, eq. 4
        context = None if text_encoder is None else text_encoder(share(ids))  # (B, L, D)
        # (under torchrun each process computes its share of the batch: train/distributed.py)
        return F.mse_loss(unet(share(noisy), share(t), context), share(noise))  # eq. 14

    return loss


def text_context(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """VQ-Diffusion's condition: CLIP's token vectors, each normalised to length 1, as its
    pipeline normalises them at sampling time."""
    context = text_encoder(ids)  # (B, L, D)
    return context / context.norm(dim=-1, keepdim=True)


def vq_diffusion_loss(transformer, embeddings, text_encoder, codes, captions, settings: Settings):
    """VQ-Diffusion's training loss (Gu et al. 2022, section 3.2, and the official
    `DiffusionTransformer._train_loss` in microsoft/VQ-Diffusion), per code position:

        x_t ~ q(x_t | x0)                      (mask-and-replace in one jump, eq. 6)
        L_vb  = KL( q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t) )   for t > 0 (eq. 7-8)
              = -log p(x0 | x_1)                                  for t = 0 (the decoder term)
        L_x0  = -log p_theta(x0 | x_t)           (the auxiliary loss: predict x0 itself)
        loss  = L_vb + lambda (2 - t/T) L_x0

    where p(x_{t-1} | x_t) = sum_x0 q(x_{t-1} | x_t, x0) p_theta(x0 | x_t) (eq. 11) is the posterior
    the sampler uses. Time steps are drawn uniformly (the official code importance-samples them
    once every step has a loss history). The official configs weight the x0 term lambda = 5e-4
    relative to the bound, for models trained for days; here lambda = 1: the bound weighs each
    masked position by the chance that it is unmasked in this very step (about 1/t), so it says
    little at high t, where the layout of the image is decided, and in half an hour of training
    the direct x0 term is what teaches that. (2 - t/T) is the official "adaptive" weight.
    """
    scheduler = VQDiffusionScheduler.from_config(VQ_SCHEDULER_CONFIG)
    T, K = scheduler.num_train_timesteps, scheduler.mask_class

    def loss(generator):
        B = settings.unet_batch
        index = torch.randint(len(codes), (B,), generator=generator)
        x_0 = codes[index]  # (B, N)
        ids, which = choose_captions(captions, index, settings, generator)
        t = torch.randint(0, T, (B,), generator=generator)
        log_q = scheduler.log_q_x_t_given_x_0(x_0, t)  # (B, K+1, N)
        uniform = torch.rand(log_q.shape, generator=generator)
        x_t = (log_q - torch.log(-torch.log(uniform + 1e-30) + 1e-30)).argmax(dim=1)  # Gumbel-max
        # under torchrun each process computes its share of the batch (train/distributed.py)
        x_0, ids, which, t, x_t = (share(x) for x in (x_0, ids, which, t, x_t))
        B = len(x_0)
        with torch.no_grad():  # the text encoder is frozen, as VQ-Diffusion freezes CLIP
            context = text_context(text_encoder, ids)  # (B, L, D)
        # the empty caption is replaced by the learned embedding, used as it is (not normalised)
        empty = (which == 2).view(B, 1, 1)
        context = torch.where(empty, embeddings.embeddings[None], context)
        log_p_x_0 = transformer(x_t, context, t)  # (B, K, N)
        # the true and the model's posterior of x_{t-1}, both (B, K+1, N); at t = 0 both are of x0
        log_onehot_x_0 = torch.log(F.one_hot(x_0, K).permute(0, 2, 1).float().clamp(min=1e-30))
        log_true = scheduler.log_posterior(log_onehot_x_0, x_t, t).clamp(-70, 0)
        log_model = scheduler.log_posterior(log_p_x_0, x_t, t).clamp(-70, 0)
        kl = (log_true.exp() * (log_true - log_model)).sum(dim=1)  # (B, N)
        decoder_nll = -(log_onehot_x_0.exp() * log_model[:, :K]).sum(dim=1)  # (B, N)
        first = (t == 0).view(B, 1)
        vb = torch.where(first, decoder_nll, kl)
        x0_nll = -(log_onehot_x_0.exp() * log_p_x_0).sum(dim=1)  # (B, N)
        adaptive = (2 - t / T).view(B, 1)
        return (vb + settings.auxiliary_weight * adaptive * x0_nll).mean()

    return loss
