"""Past one process (minildm/train/distributed.py): `torchrun -m minildm train` and `sd --prompts`
under 2 CPU processes (gloo), against one process.

- each loss's two shares average to the whole batch's loss, computed on half the batch each;
- one step of each loss gives, under 2 ranks, the single process's gradients (within 1e-5 of the
  largest); after 20 + 20 steps of `train sd --quick` the weights are as close to one process's as
  another thread count makes them (Adam turns rounding in near-zero gradients into whole steps);
- a run killed mid-way resumes under torchrun, and two rendezvous agents (as on two machines)
  train, to the uninterrupted run's weights exactly;
- 12 prompts shared by 2 ranks give the same 12 PNGs, byte for byte, as one process;
- bad input: a world size that does not divide the batch, bad --prompts files, --steps below 1, a
  rank that dies (torchrun stops the other: no rank is left waiting).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minildm.__main__ import main
from minildm.autoencoder import AutoencoderKL
from minildm.clip import CLIPTextModel
from minildm.train.loop import epsilon_loss, kl_autoencoder_loss, vq_diffusion_loss
from minildm.train.recipes import (
    QUICK_TEXT,
    QUICK_TRANSFORMER,
    QUICK_UNET,
    QUICK_VAE,
    SCHEDULE,
    TEXT,
    Settings,
)
from minildm.unet import UNet
from minildm.vq_transformer import LearnedClassifierFreeEmbeddings, VQTransformer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
QUICK = ["--quick", "--steps", "20", "--minutes", "60", "--seed", "3"]  # the steps decide


def run(command: list, timeout: float = 600, environment=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environment
    )
    print(f"$ {' '.join(command[2:])}: exit {result.returncode}")
    return result


def minildm_command(*arguments) -> list:
    return [sys.executable, "-m", "minildm", *arguments]


def torchrun(processes: int, *arguments) -> list:
    return [*TORCHRUN, str(processes), "-m", "minildm", *arguments]


def final_weights(folder: Path) -> dict:
    """{model: state dict} of every stage's finished models, in float32, from checkpoint.pt."""
    checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {
        name: weights
        for stage in ("vae", "unet")
        for name, weights in checkpoint[stage]["models"].items()
    }


# --- the shares: no processes needed ---------------------------------------------------------------


def losses_of_each_share(make_loss, monkeypatch) -> tuple:
    """(the whole batch's loss, [rank 0's, rank 1's]) from the same seed, as 2 ranks would draw."""
    whole = make_loss()(torch.Generator().manual_seed(0)).item()
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        shares.append(make_loss()(torch.Generator().manual_seed(0)).item())
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("RANK")
    return whole, shares


@pytest.mark.parametrize("system", ["sd-autoencoder", "sd-unet", "vq-diffusion"])
def test_two_shares_average_to_the_whole_batch(system, monkeypatch):
    """Each rank draws the whole batch from the seed and computes its half: the mean of the two
    halves' losses is the whole batch's loss, and the models see half the batch."""
    torch.manual_seed(0)
    settings = Settings("sd" if system != "vq-diffusion" else "vq-diffusion", 5.0, 0, True)
    images = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8)
    captions = torch.randint(0, 100, (64, 3, QUICK_TEXT.max_length))
    seen = []

    def record(module, inputs, output):
        seen.append(len(inputs[0]))

    if system == "sd-autoencoder":
        vae = AutoencoderKL(QUICK_VAE)
        vae.encoder.register_forward_hook(record)
        batch = settings.vae_batch

        def make_loss():
            return kl_autoencoder_loss(vae, images, settings)
    elif system == "sd-unet":
        unet, text = UNet(QUICK_UNET), CLIPTextModel(QUICK_TEXT)
        unet.register_forward_hook(record)
        latents = (torch.randn(64, 4, 8, 8), 0.1 * torch.rand(64, 4, 8, 8), 0.5)
        batch = settings.unet_batch

        def make_loss():
            return epsilon_loss(unet, text, latents, captions, SCHEDULE, settings)
    else:
        text = CLIPTextModel(TEXT)  # the quick transformer reads the tiny SD's CLIP
        transformer = VQTransformer(QUICK_TRANSFORMER)
        transformer.register_forward_hook(record)
        embeddings = LearnedClassifierFreeEmbeddings(length=TEXT.max_length, hidden_size=TEXT.width)
        codes = torch.randint(0, QUICK_TRANSFORMER.num_classes - 1, (64, 64))
        batch = settings.unet_batch

        def make_loss():
            return vq_diffusion_loss(transformer, embeddings, text, codes, captions, settings)

    whole, shares = losses_of_each_share(make_loss, monkeypatch)
    error = abs((shares[0] + shares[1]) / 2 - whole) / abs(whole)
    print(
        f"{system}: whole batch {whole:.6f}, shares {shares[0]:.6f} and {shares[1]:.6f}, "
        f"their mean off by {error:.1e} relative; batches seen {seen}"
    )
    assert seen == [batch, batch // 2, batch // 2]
    assert shares[0] != shares[1]  # two different halves
    assert error < 1e-5


# --- torchrun, 2 processes ------------------------------------------------------------------------


def test_one_step_of_two_processes_is_the_step_of_one(tmp_path):
    """One batch of each loss (tests/distributed_gradients.py), alone and as 2 ranks of half the
    batch each: DDP's averaged gradients are the whole batch's. Measured against the largest
    gradient of the models (a gradient that is 0 in exact arithmetic, as that of a bias before a
    GroupNorm or of attention's key bias, holds only rounding and has no scale of its own)."""
    script = str(Path(__file__).parent / "distributed_gradients.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for command in ([sys.executable, script, str(one)], [*TORCHRUN, "2", script, str(two)]):
        result = run(command)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (torch.load(path, weights_only=True) for path in (one, two))
    assert (
        one.keys() == two.keys() == {"kl-autoencoder", "vq-autoencoder", "unet", "vq-transformer"}
    )
    codebook = "codebook after the restart"
    for name, expected in one.items():
        restarted = expected.pop(codebook, None)
        got = two[name]
        assert got.keys() - {codebook} == expected.keys()
        scale = max(float(g.abs().max()) for g in expected.values())
        error = max(float((got[key] - g).abs().max()) for key, g in expected.items()) / scale
        print(
            f"{name}: {len(expected)} gradients, 2 ranks vs 1 process: largest difference "
            f"{error:.1e} of the largest gradient ({scale:.2e})"
        )
        assert error < 1e-5
        if restarted is not None:  # restarted at the whole batch's latents, gathered from 2 ranks
            difference = float((got[codebook] - restarted).abs().max() / restarted.abs().max())
            print(f"{name}: the codebook after its first restart differs by {difference:.1e}")
            assert difference < 1e-5


def train_command(out: Path) -> list:
    return ["train", "sd", "--out", str(out), *QUICK]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`train sd --quick --steps 20` as one process (1 and 2 threads) and as 2 ranks: folders."""
    folders = {}
    for name in ("one process, 1 thread", "one process, 2 threads", "2 ranks"):
        folder = tmp_path_factory.mktemp("run") / "run"
        threads = "2" if "2 threads" in name else "1"
        command = torchrun(2, *train_command(folder))
        if name.startswith("one"):
            command = minildm_command(*train_command(folder))
        started = time.perf_counter()
        result = run(command, environment={"OMP_NUM_THREADS": threads})
        assert result.returncode == 0, result.stderr[-3000:]
        print(f"{name}: {time.perf_counter() - started:.0f} s")
        folders[name] = (folder, result.stdout)
    return folders


def test_two_processes_train_the_weights_of_one(runs):
    """After 20 + 20 steps, 2 ranks differ from one process within the issue's 1e-5 relative, or
    no more than twice what one process differs from itself with another thread count, where
    that is larger: Adam divides each gradient by its own size, so a rounding difference in a
    near-zero gradient moves a weight by the learning rate, in any change of summation order
    (measured: 2.7e-3 of a GroupNorm bias's largest weight). The thread yardstick alone depends on
    the host: the autoencoder's 2 ranks were 5.2e-6 and 5.0e-6 from one process on an AVX2 and an
    AVX-512 host, its 2 threads 5.0e-6 and 1.8e-6; the UNet's 2 ranks 1.0e-5 and 9.0e-6, its 2
    threads 1.1e-5 and 8.8e-6."""
    folder, output = runs["2 ranks"]
    print(output[-1200:])
    # rank 0 alone speaks and writes
    assert output.count("training tiny sd") == 1 and "2 processes" in output
    assert output.count("unet: 20 steps") == 1
    assert (folder / "samples.png").is_file() and (folder / "unet").is_dir()
    one = final_weights(runs["one process, 1 thread"][0])
    threads = difference_by_model(final_weights(runs["one process, 2 threads"][0]), one)
    ranks = difference_by_model(final_weights(folder), one)
    for model in one:
        print(
            f"{model}: relative difference of all its weights from one process with 1 thread: "
            f"2 ranks {ranks[model]:.1e}, 2 threads {threads[model]:.1e}"
        )
        assert ranks[model] <= max(1e-5, 2 * threads[model])


def difference_by_model(a: dict, b: dict) -> dict:
    """{model: ||a - b|| / ||b|| over all its weights}."""
    return {
        model: (
            sum(float((a[model][k] - w).square().sum()) for k, w in b[model].items())
            / sum(float(w.square().sum()) for w in b[model].values())
        )
        ** 0.5
        for model in b
    }


def test_a_killed_run_resumes_under_torchrun(runs, tmp_path):
    """Killed once its first checkpoint is written (the autoencoder's stage done), the same
    command resumes and ends with the weights of the uninterrupted run."""
    folder = tmp_path / "run"
    command = torchrun(2, *train_command(folder))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (folder / "checkpoint.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 5 minutes"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks, at once
    process.wait()
    assert process.returncode != 0, "the run ended before it could be killed"
    assert "scores" not in (folder / "training.json").read_text()  # it had not finished
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming tiny sd" in result.stdout
    error = difference_by_model(final_weights(folder), final_weights(runs["2 ranks"][0]))
    print(f"killed and resumed vs uninterrupted, 2 ranks each: {error}")
    assert max(error.values()) < 1e-5


def test_two_machines_by_rendezvous_train_the_weights_of_one(runs, tmp_path):
    """Two torchrun agents, as on two machines (`--nnodes 2`, one process each, c10d rendezvous;
    here both on this one): the same world of 2 ranks as `--nproc_per_node 2`, the same weights."""
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path / "run"
    agent = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"),
        *("--rdzv_id", "test", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"),
        *("-m", "minildm", *train_command(folder)),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            agent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    print(outputs[0][-600:])
    assert [a.returncode for a in agents] == [0, 0], [o[-2000:] for o in outputs]
    assert sum(o.count("training tiny sd") for o in outputs) == 1
    error = difference_by_model(final_weights(folder), final_weights(runs["2 ranks"][0]))
    print(f"2 agents of 1 process vs 1 agent of 2 processes: {error}")
    assert max(error.values()) < 1e-6


PROMPTS = [
    f"a {colour} {shape} on a {background} background"
    for colour, shape, background in [
        ("red", "circle", "blue"),
        ("green", "square", "yellow"),
        ("blue", "triangle", "white"),
        ("yellow", "circle", "black"),
    ]
]


def test_twelve_prompts_on_two_processes_write_the_same_files(tmp_path):
    lines = [f"{prompt} --seed {seed}" for prompt in PROMPTS for seed in (0, 1)]
    lines += ["# four without a seed: --seed plus their number", "", *PROMPTS]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    written = {}
    for name, command in [("one", minildm_command), ("two", lambda *a: torchrun(2, *a))]:
        out = tmp_path / name
        result = run(command("sd", "--prompts", str(prompts), "--steps", "5", "--out", str(out)))
        assert result.returncode == 0, result.stderr[-3000:]
        written[name] = {path.name: path.read_bytes() for path in out.glob("*.png")}
    print(sorted(written["one"]))
    assert len(written["one"]) == 12
    assert "sd_a-red-circle-on-a-blue-background_seed1_0.png" in written["one"]
    assert "sd_a-yellow-circle-on-a-black-background_seed11_0.png" in written["one"]  # 8 + 3
    assert written["two"] == written["one"]


# --- bad input ------------------------------------------------------------------------------------


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tmp_path):
    result = run(torchrun(3, "train", "sd", "--out", str(tmp_path / "run"), *QUICK), timeout=300)
    print(result.stderr[-600:])
    assert result.returncode != 0
    assert "does not split into 3 equal shares" in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "holds no prompt"),
        (b"\n# only a comment\n\n", "holds no prompt"),
        (b"a red circle\na blue \xe9toile\n", "line 2 holds the byte 0xE9"),
        (b"a red circle --seed -3\n", "line 1: --seed -3 is not a seed"),
        (b"a red circle\na blue square --seed\n", "line 2: --seed goes at the end"),
        (b"a red circle --seed 3 on blue\n", "line 1: --seed goes at the end"),
        # the second line's seed is --seed (0) plus its number (1): line 1's
        (b"a red circle --seed 1\na red circle\n", "line 2: the same prompt and seed as line 1"),
    ],
)
def test_bad_prompt_files_are_refused_before_loading(content, words, monkeypatch, tmp_path):
    from minildm.tools import generate

    def refuse_to_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the prompts were checked")

    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    (tmp_path / "prompts.txt").write_bytes(content)
    with pytest.raises(SystemExit) as raised:
        main(["sd", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "out")])
    print(raised.value)
    assert str(raised.value).startswith("error: ") and words in str(raised.value)


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_train_refuses_steps_below_one(steps, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train", "sd", "--out", str(tmp_path / "run"), "--quick", "--steps", steps])
    print(raised.value)
    assert f"--steps must be a positive number of steps per stage, got {steps}" in str(raised.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_prompt_and_prompts_together_are_refused(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    for arguments in (["a red circle", "--prompts", str(tmp_path / "prompts.txt")], []):
        with pytest.raises(SystemExit) as raised:
            main(["sd", *arguments, "--out", str(tmp_path / "out")])
        print(raised.value)
        assert "give a prompt or --prompts FILE" in str(raised.value)


def children(pid: int) -> list:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_rank_that_dies_stops_the_run(tmp_path):
    """Rank 1 killed mid-training: torchrun ends the run with an error naming it, and rank 0 does
    not wait for it at the next step's gradient average."""
    folder = tmp_path / "run"
    command = torchrun(2, "train", "sd", "--out", str(folder), "--quick", "--minutes", "60")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (folder / "checkpoint.pt").exists():  # both ranks are past the autoencoder
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    ranks = children(process.pid)
    assert len(ranks) == 2, ranks
    rank_1 = [pid for pid in ranks if b"RANK=1\x00" in Path(f"/proc/{pid}/environ").read_bytes()]
    os.kill(rank_1[0], signal.SIGKILL)
    killed = time.monotonic()
    output, _ = process.communicate(timeout=120)
    print(output[-1500:])
    print(f"the run ended {time.monotonic() - killed:.1f} s after rank 1 was killed")
    assert process.returncode != 0
    assert "rank: 1" in output and "SIGKILL" in output
    for pid in ranks:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        ), f"rank process {pid} still runs"
