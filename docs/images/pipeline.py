"""Draw docs/images/pipeline.png, the README's diagram of Stable Diffusion's sampling pipeline with
the minildm file that implements each box.

    python docs/images/pipeline.py

Needs matplotlib (`pip install ".[notebooks]"`). The PNG is written without a timestamp, so the
same matplotlib writes the same bytes.
"""

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

OUT = Path(__file__).with_suffix(".png")
BLUE, ORANGE, GRAY = "#dbe9f6", "#fde2c8", "#eeeeee"

# name: (x, y, width, height, title, file or None, colour); data units, y up
BOXES = {
    "prompt": (0.2, 5.0, 3.0, 1.2, "text", '"a red circle on\na blue background"', GRAY),
    "tokenizer": (4.3, 5.0, 4.0, 1.2, "tokenizer", "minildm/tokenizer.py", BLUE),
    "encoder": (10.1, 5.0, 4.8, 1.2, "text encoder", "minildm/clip.py\n(LDM: ldm_bert.py)", BLUE),
    "noise": (0.2, 1.7, 4.6, 1.2, "noise x_T ~ N(0, I)", "minildm/schedulers/", GRAY),
    "unet": (9.9, 2.5, 5.2, 1.0, "UNet", "minildm/unet.py", ORANGE),
    "step": (9.9, 0.7, 5.2, 1.0, "scheduler step", "minildm/schedulers/", ORANGE),
    "decoder": (16.9, 1.7, 4.2, 1.2, "decoder", "minildm/autoencoder.py", BLUE),
    "image": (21.9, 1.7, 1.8, 1.2, "image", None, GRAY),
}
LOOP = (9.5, 0.4, 6.0, 3.65)  # x, y, width, height of the denoising loop's frame


def edge(name, side):
    """The middle of a box's left or right side, just outside it."""
    x, y, width, height, *_ = BOXES[name]
    return (x - 0.1 if side == "left" else x + width + 0.1), y + height / 2


def arrow(ax, start, end, label=None, at=None, ha="center"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3))
    if label:
        ax.text(*at, label, ha=ha, va="center", fontsize=9, color="#444444", linespacing=1.0)


def main():
    fig, ax = plt.subplots(figsize=(10.8, 3.9), dpi=100)
    # the pipeline runs everything inside this frame
    ax.add_patch(Rectangle((0.0, -0.7), 24.0, 7.1, fill=False, ls="--", lw=1.0, ec="#888888"))
    caption = "minildm/pipelines/stable_diffusion.py: StableDiffusionPipeline runs it all"
    ax.text(
        12.0,
        -0.38,
        caption,
        ha="center",
        va="center",
        fontsize=9.5,
        family="monospace",
        color="#333333",
    )
    x, y, width, height = LOOP
    ax.add_patch(
        FancyBboxPatch(
            (x, y), width, height, boxstyle="round,pad=0.05", fc="#fff6ec", ec="#c07020", lw=1.2
        )
    )
    ax.text(
        x + width / 2,
        y + height - 0.22,
        "denoising loop, T steps",
        ha="center",
        va="center",
        fontsize=9.5,
        weight="bold",
        color="#8a4a10",
    )
    for name, (x, y, width, height, title, file, colour) in BOXES.items():
        ax.add_patch(
            FancyBboxPatch(
                (x, y), width, height, boxstyle="round,pad=0.05", fc=colour, ec="black", lw=1.0
            )
        )
        middle = x + width / 2
        if file is None:
            ax.text(middle, y + height / 2, title, ha="center", va="center", fontsize=10.5)
        elif name == "prompt":
            ax.text(middle, y + height - 0.25, title, ha="center", va="center", fontsize=10)
            ax.text(middle, y + 0.4, file, ha="center", va="center", fontsize=9.5, linespacing=1.0)
        else:
            two_lines = "\n" in file
            ax.text(
                middle,
                y + height - (0.25 if two_lines else 0.32),
                title,
                ha="center",
                va="center",
                fontsize=10.5,
                weight="bold",
            )
            ax.text(
                middle,
                y + (0.4 if two_lines else 0.32),
                file,
                ha="center",
                va="center",
                fontsize=9.5,
                family="monospace",
                linespacing=1.05,
            )

    arrow(ax, edge("prompt", "right"), edge("tokenizer", "left"))
    arrow(ax, edge("tokenizer", "right"), edge("encoder", "left"), "ids", (9.2, 5.85))
    down = BOXES["encoder"][0] + BOXES["encoder"][2] / 2
    arrow(
        ax,
        (down, 4.9),
        (down, LOOP[1] + LOOP[3] + 0.1),
        "context (cross-attention)",
        (down + 0.3, 4.5),
        ha="left",
    )
    noise_y = edge("noise", "right")[1]
    arrow(ax, edge("noise", "right"), (LOOP[0] - 0.1, noise_y), "x_T", (7.1, noise_y + 0.25))
    up_x = BOXES["step"][0] + 0.6
    down_x = BOXES["unet"][0] + BOXES["unet"][2] - 0.6
    arrow(ax, (up_x, 1.78), (up_x, 2.42), "x_t-1", (up_x + 0.2, 2.1), ha="left")
    arrow(ax, (down_x, 2.42), (down_x, 1.78), "noise prediction", (down_x - 0.2, 2.1), ha="right")
    decoder_y = edge("decoder", "left")[1]
    arrow(
        ax,
        (LOOP[0] + LOOP[2] + 0.1, decoder_y),
        edge("decoder", "left"),
        "x_0",
        (16.2, decoder_y + 0.25),
    )
    arrow(ax, edge("decoder", "right"), edge("image", "left"))

    ax.set_xlim(-0.1, 24.1)
    ax.set_ylim(-0.8, 6.5)
    ax.axis("off")
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=0.99)
    fig.savefig(OUT, metadata={"Software": None}, pil_kwargs={"optimize": True})
    print(f"{OUT}: {OUT.stat().st_size / 1000:.1f} kB")


if __name__ == "__main__":
    main()
