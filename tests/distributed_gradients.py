"""Run by tests/test_distributed.py, alone or under torchrun: one batch of each training loss of
minildm/train/loop.py, backward through train/distributed.py's averaged_gradients (DDP under
torchrun), and the gradients written by rank 0 to the file named on the command line.

    python tests/distributed_gradients.py OUT.pt
    torchrun --standalone --nproc_per_node 2 tests/distributed_gradients.py OUT.pt
"""

import sys

import torch

from minildm.autoencoder import AutoencoderKL, VQModel
from minildm.clip import CLIPTextModel
from minildm.train import distributed
from minildm.train.loop import (
    epsilon_loss,
    kl_autoencoder_loss,
    vq_autoencoder_loss,
    vq_diffusion_loss,
)
from minildm.train.recipes import (
    QUICK_TEXT,
    QUICK_TRANSFORMER,
    QUICK_UNET,
    QUICK_VAE,
    QUICK_VQ_VAE,
    SCHEDULE,
    TEXT,
    Settings,
)
from minildm.unet import UNet
from minildm.vq_transformer import LearnedClassifierFreeEmbeddings, VQTransformer


def losses() -> dict:
    """{name: (models, batch_loss)}, each from fixed random weights and data."""
    torch.manual_seed(0)
    sd, vq = Settings("sd", 5.0, 0, True), Settings("vq-diffusion", 5.0, 0, True)
    images = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8)
    captions = torch.randint(0, 1000, (64, 3, QUICK_TEXT.max_length))
    vae, vqvae = AutoencoderKL(QUICK_VAE), VQModel(QUICK_VQ_VAE)
    unet, text = UNet(QUICK_UNET), CLIPTextModel(QUICK_TEXT)
    latents = (torch.randn(64, 4, 8, 8), 0.1 * torch.rand(64, 4, 8, 8), 0.5)
    transformer, clip = VQTransformer(QUICK_TRANSFORMER), CLIPTextModel(TEXT)
    embeddings = LearnedClassifierFreeEmbeddings(length=TEXT.max_length, hidden_size=TEXT.width)
    codes = torch.randint(0, QUICK_TRANSFORMER.num_classes - 1, (64, 64))
    return {
        "kl-autoencoder": ({"vae": vae}, kl_autoencoder_loss(vae, images, sd)),
        "vq-autoencoder": ({"vqvae": vqvae}, vq_autoencoder_loss(vqvae, images, sd, fresh=True)),
        "unet": (
            {"unet": unet, "text_encoder": text},
            epsilon_loss(unet, text, latents, captions, SCHEDULE, sd),
        ),
        "vq-transformer": (
            {"transformer": transformer, "embeddings": embeddings},
            vq_diffusion_loss(transformer, embeddings, clip, codes, captions, vq),
        ),
    }


if __name__ == "__main__":
    distributed.start()
    gradients = {}
    for name, (models, batch_loss) in losses().items():
        # kept in a name until backward: DDP's gradient hooks live as long as its wrapper
        averaged = distributed.averaged_gradients(models, batch_loss)
        averaged(torch.Generator().manual_seed(1)).backward()
        gradients[name] = {
            f"{model}.{key}": p.grad.clone()
            for model, module in models.items()
            for key, p in module.named_parameters()
            if p.grad is not None
        }
        # the codebook after the first step's restart (at the whole batch's latents)
        if name == "vq-autoencoder":
            gradients[name]["codebook after the restart"] = models["vqvae"].codebook.weight.detach()
    if distributed.is_main():
        torch.save(gradients, sys.argv[1])
    distributed.stop()
