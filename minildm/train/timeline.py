"""A run's timeline: what the model draws, and how well, while it trains (`train --timeline N`).

Every N minutes of the denoising stage's training time (and once more when it ends), the trainer
hands the current averaged weights (the EMA it would ship) to `Timeline.record`, which

- draws the held-out triples at the center position (seed 0, the evaluation's sampler and
  guidance) and saves that row as timeline/step_NNNNNN.png,
- scores them, and the six seen triples, with the shapes world's scorer,
- measures the noise-prediction loss (Ho et al. 2020, eq. 14) of a fixed batch in ten bands of
  timesteps, with fixed noise, so that the points compare: which t are hard, and when they are
  learnt;

and appends the point to timeline.json in the run folder. At the end, timeline.png stacks the rows,
first point on top. Recording costs a few seconds a point and is not counted in the stage's time,
and it draws from its own generators: a run with --timeline takes the same steps as one without.
Only the text-to-image UNets (sd, ldm) keep a timeline.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minildm import shapes
from minildm.checkpoints.files import write_file, write_text
from minildm.pipelines import LDMTextToImagePipeline, StableDiffusionPipeline
from minildm.schedulers import DDIMScheduler
from minildm.train.evaluate import generate, prompt_scenes
from minildm.train.recipes import SAMPLING, SCHEDULE, SCHEDULER_CONFIGS, SEEN_TRIPLES

SYSTEMS = ("sd", "ldm")
BANDS = 10  # timestep bands of 100: [0, 100), [100, 200), ... [900, 1000)


class Timeline:
    def __init__(
        self, out: Path, system: str, every_minutes: float, steps: int = 25, resuming=False
    ):
        self.out, self.system, self.every_s, self.steps = (
            Path(out),
            system,
            every_minutes * 60,
            steps,
        )
        self.path = self.out / "timeline.json"
        # a resumed run keeps the points up to its checkpoint (forget_after); a fresh one none
        resumed = resuming and self.path.exists()
        self.points = json.loads(self.path.read_text())["points"] if resumed else []

    def forget_after(self, step: int):
        """A resumed run starts from its last checkpoint: drop the points recorded after it."""
        self.points = [point for point in self.points if point["step"] <= step]

    def due(self, elapsed_s: float) -> bool:
        """Is a point due after `elapsed_s` seconds of training? (The first one at 0 s.)"""
        if not self.points:
            return True
        return elapsed_s >= self.points[-1]["seconds"] + self.every_s

    def prepare(self, autoencoder, text_encoder, tokenizer, unet, latents, captions):
        """The parts a point needs: the frozen autoencoder, the models in training (read at each
        point), and the cached latents with their captions for the loss bands."""
        self.autoencoder, self.text_encoder, self.tokenizer, self.unet = (
            autoencoder,
            text_encoder,
            tokenizer,
            unet,
        )
        means, stds, scale = latents
        generator = torch.Generator().manual_seed(2024)
        count = 40 * BANDS  # 40 latents a band
        index = torch.randperm(len(means), generator=generator)[:count]
        x0 = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        self.x0 = x0 * scale  # (400, 4, 8, 8)
        self.ids = captions[index, 0]  # each image's first caption, (400, L)
        width = SCHEDULE["num_train_timesteps"] // BANDS
        self.t = torch.arange(count) // 40 * width + torch.randint(
            width, (count,), generator=generator
        )
        self.noise = torch.randn(self.x0.shape, generator=generator)

    @torch.no_grad()
    def loss_by_band(self) -> list:
        """Mean squared error of the predicted noise, per band of 100 timesteps."""
        alphas_cumprod = DDIMScheduler(**SCHEDULE).alphas_cumprod
        a = alphas_cumprod[self.t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * self.x0 + (1 - a).sqrt() * self.noise  # Ho et al. 2020, eq. 4
        errors = []
        for chunk in range(0, len(noisy), 100):
            part = slice(chunk, chunk + 100)
            predicted = self.unet(noisy[part], self.t[part], self.text_encoder(self.ids[part]))
            errors.append(F.mse_loss(predicted, self.noise[part], reduction="none"))
        per_image = torch.cat(errors).mean(dim=(1, 2, 3))  # (400,)
        return [round(float(band.mean()), 4) for band in per_image.view(BANDS, -1)]

    @torch.no_grad()
    def record(self, step: int, elapsed_s: float, lr: float):
        """One point, from the models as they are now (the caller swaps the average in)."""
        scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIGS[self.system])
        if self.system == "sd":
            pipe = StableDiffusionPipeline(
                self.autoencoder, self.text_encoder, self.tokenizer, self.unet, scheduler
            )
        else:
            pipe = LDMTextToImagePipeline(
                self.autoencoder, self.text_encoder, self.tokenizer, self.unet, scheduler
            )
        scores = {}
        for name, triples in [("held_out", list(shapes.HELD_OUT)), ("seen", SEEN_TRIPLES)]:
            scenes = [s for s in prompt_scenes(triples) if s["position"] == "center"]
            prompts = [
                shapes.caption(s["colour"], s["shape"], s["background"], s["position"])
                for s in scenes
            ]
            images = generate(pipe, prompts, 0, self.steps, **SAMPLING[self.system])
            scores[name] = shapes.score(images, scenes)
            if name == "held_out":  # (12, 64, 64, 3) -> one row, 12 x 64 pixels wide
                row = Image.fromarray(np.concatenate(list(images), axis=1))
        (self.out / "timeline").mkdir(exist_ok=True)
        write_file(
            self.out / "timeline" / f"step_{step:06d}.png",
            lambda temporary: row.save(temporary, optimize=True),
        )
        point = {
            "step": step,
            "seconds": round(elapsed_s, 1),
            "minutes": round(elapsed_s / 60, 2),
            "lr": lr,
            "held_out_scores": scores["held_out"],
            "seen_scores": scores["seen"],
            "loss_by_band": self.loss_by_band(),
        }
        self.points.append(point)
        write_text(
            self.path,
            json.dumps({"bands": f"{BANDS} bands of timesteps", "points": self.points}, indent=1)
            + "\n",
        )
        print(
            f"timeline: step {step}, {point['minutes']:.1f} min: held-out "
            f"{scores['held_out']['all']:.2f}, seen {scores['seen']['all']:.2f}, loss by band "
            f"{point['loss_by_band']}",
            flush=True,
        )

    def finish(self):
        """timeline.png: the rows of every point, top to bottom."""
        rows = [
            Image.open(self.out / "timeline" / f"step_{p['step']:06d}.png") for p in self.points
        ]
        strip = Image.new("RGB", (rows[0].width, sum(row.height for row in rows)))
        for i, row in enumerate(rows):
            strip.paste(row, (0, i * row.height))
        write_file(
            self.out / "timeline.png", lambda temporary: strip.save(temporary, optimize=True)
        )
