"""`python -m minildm explore`: a live explorer in the browser, computed on the CPU by the embedded
models (or official weights given with --weights), for a class to watch diffusion happen.

One page (explore.html, shipped beside this file; nothing fetched from the network) talks to this
server, the standard library's ThreadingHTTPServer:

- GET /              the page
- GET /api/options   the systems, schedulers, defaults and limits the page offers
- POST /api/generate a JSON request; the answer streams one JSON line per step (the latents
                     decoded, and the clean image the step predicts), then the result: the image,
                     and for the text-conditioned UNets one attention map per token (DAAM's
                     aggregation, minildm/pipelines/attention_maps.py) with its share

Safe to leave running: it listens on 127.0.0.1 unless --host says otherwise; it refuses a Host
header that is not its own address (a web page elsewhere cannot reach it by DNS rebinding); it caps
bodies, prompts and steps, and checks every value with the pipelines' own checks, answering their
message as JSON (a 400), never a traceback; one generation runs at a time, MAX_WAITING more wait,
and further requests get a 503 "busy"; a client that disconnects stops its run within a step.
"""

import base64
import io
import json
import math
import threading
import time
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import minildm
from minildm import schedulers
from minildm.pipelines.attention_maps import Recorder
from minildm.unet import TransformerBlock

PAGE = Path(__file__).with_name("explore.html")
MAX_BODY = 4 << 20  # bytes: a 512 x 512 PNG as a data URL fits easily
MAX_PROMPT = 500  # characters
MAX_STEPS = 200
MAX_WAITING = 2  # generations that may wait while one runs
SYSTEMS = ("sd", "ldm", "ldm-uncond", "vq-diffusion")
PIPELINES = {
    "sd": minildm.StableDiffusionPipeline,
    "ldm": minildm.LDMTextToImagePipeline,
    "ldm-uncond": minildm.LDMPipeline,
    "vq-diffusion": minildm.VQDiffusionPipeline,
}
DEFAULTS = {  # what the embedded models were scored with (train/recipes.py SAMPLING)
    "sd": {"steps": 25, "guidance": 4.0},
    "ldm": {"steps": 25, "guidance": 4.0},
    "ldm-uncond": {"steps": 25, "guidance": 1.0},
    "vq-diffusion": {"steps": 50, "guidance": 2.0},
}
SAMPLERS = [
    n for n in schedulers.__all__ if n not in ("VQDiffusionScheduler", "DDIMInverseScheduler")
]


class ClientGone(Exception):
    """The browser closed the connection: the run stops at its next step."""


class Explorer:
    """The loaded pipelines (each loaded on first use) and the one-at-a-time rule."""

    def __init__(self, weights: dict):
        self.folders = {
            system: weights.get(system, minildm.TINY_MODELS[system]) for system in SYSTEMS
        }
        self.pipes = {}
        self.own_schedulers = {}
        self.running = threading.Lock()
        self.waiting = 0
        self.waiting_lock = threading.Lock()

    def pipe(self, system: str, kind: str = "text"):
        key = (system, kind)
        if key not in self.pipes:
            cls = PIPELINES[system]
            if system == "sd" and kind == "img2img":
                cls = minildm.StableDiffusionImg2ImgPipeline
            elif system == "sd" and kind == "inpaint":
                cls = minildm.StableDiffusionInpaintPipeline
            self.pipes[key] = cls.from_pretrained(self.folders[system])
            self.own_schedulers[key] = self.pipes[key].scheduler
        return self.pipes[key]

    def scheduler(self, system: str, kind: str, sampler: str | None):
        """The folder's own scheduler, or `sampler` on its training schedule."""
        own = self.own_schedulers[(system, kind)]
        if sampler is None or system == "vq-diffusion":
            return own
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the folder's DDIM options do not apply to others
            return getattr(schedulers, sampler).from_config(own.config)

    def options(self) -> dict:
        return {
            "systems": list(SYSTEMS),
            "folders": {system: str(folder) for system, folder in self.folders.items()},
            "samplers": SAMPLERS,
            "defaults": DEFAULTS,
            "limits": {"prompt": MAX_PROMPT, "steps": MAX_STEPS, "body": MAX_BODY},
        }


# --- one request -------------------------------------------------------------------------------


def read_request(body: bytes) -> dict:
    """The JSON body, with the types the page sends; ValueError says what is wrong."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"the request is not JSON ({error})") from None
    if not isinstance(request, dict):
        raise ValueError("the request must be a JSON object")
    system = request.get("system", "sd")
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {list(SYSTEMS)}, got {system!r}")
    prompt = request.get("prompt", "")
    negative = request.get("negative") or None
    for name, text in (("prompt", prompt), ("negative", negative or "")):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string, got {type(text).__name__}")
        if len(text) > MAX_PROMPT:
            raise ValueError(f"{name} has {len(text)} characters; at most {MAX_PROMPT}")
    settings = {"system": system, "prompt": prompt, "negative": negative}
    for name, kind, default in [
        ("seed", int, 0),
        ("steps", int, DEFAULTS[system]["steps"]),
        ("guidance", float, DEFAULTS[system]["guidance"]),
        ("eta", float, 0.0),
        ("strength", float, 0.8),
    ]:
        value = request.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if kind is int and value != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        settings[name] = kind(value)
    if not 0 <= settings["seed"] < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {settings['seed']}")
    if not 1 <= settings["steps"] <= MAX_STEPS:
        raise ValueError(f"steps must lie in [1, {MAX_STEPS}] here, got {settings['steps']}")
    sampler = request.get("sampler") or None
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    settings["sampler"] = sampler
    settings["image"] = picture(request.get("image"), "image", "RGB")
    settings["mask"] = picture(request.get("mask"), "mask", "L")
    if settings["mask"] is not None and settings["image"] is None:
        raise ValueError("a mask needs an image to repaint")
    if (settings["image"] is not None) and system != "sd":
        raise ValueError("image-to-image and inpainting run with the sd system")
    return settings


def picture(data_url, name: str, mode: str):
    """A PNG or JPEG sent as a data URL -> a PIL image in `mode`, or None."""
    if data_url in (None, ""):
        return None
    if not isinstance(data_url, str) or not data_url.startswith("data:image/"):
        raise ValueError(f"{name} must be a data URL (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data_url.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > 1024 * 1024:
                raise ValueError(f"{name} is {image.width}x{image.height}; at most 1024x1024")
            return image.convert(mode)
    except (IndexError, ValueError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} is not a readable image ({error})") from None


def png(array: np.ndarray) -> str:
    """(H, W, 3) or (H, W) uint8 -> a PNG data URL."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> the first image as (H, W, 3) uint8."""
    image = (images[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0)
    return (image * 255).round().byte().numpy()


class StepRecorder:
    """The UNet's noise prediction at each step (by a forward hook, the output untouched), to show
    the clean image the step predicts: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (Ho et al. 2020,
    eq. 15), with a_t interpolated at fractional timesteps."""

    def __init__(self, pipe, guidance: float, guided: bool):
        self.pipe, self.guidance, self.guided = pipe, guidance, guided
        self.x0 = None
        self.hook = pipe.unet.register_forward_hook(self.record)

    def record(self, module, args, output):
        x, t = args[0], args[1]
        eps = output.float()
        if self.guided:
            unconditional, conditional = eps.chunk(2)
            eps = unconditional + self.guidance * (conditional - unconditional)
            x = x.chunk(2)[1]
        x = x[:, : eps.shape[1]].float()  # inpainting's UNet reads 5 more channels
        alphas = self.pipe.scheduler.alphas_cumprod.double().numpy()
        a_t = float(np.interp(float(t), np.arange(len(alphas)), alphas))
        self.x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)

    def remove(self):
        self.hook.remove()


def generate(explorer: Explorer, settings: dict, send):
    """Run one request, calling send(dict) after each step and with the result. Errors of the
    request raise ValueError (before the first step, the handler answers 400 with the message)."""
    system = settings["system"]
    kind = "text"
    if settings["image"] is not None:
        kind = "inpaint" if settings["mask"] is not None else "img2img"
    pipe = explorer.pipe(system, kind)
    pipe.scheduler = explorer.scheduler(system, kind, settings["sampler"])
    generator = torch.Generator().manual_seed(settings["seed"])
    options = {"num_inference_steps": settings["steps"], "generator": generator}
    if system != "ldm-uncond":
        options["guidance_scale"] = settings["guidance"]
    if system in ("sd", "ldm", "ldm-uncond"):
        options["eta"] = settings["eta"]
    if system == "sd":
        options["negative_prompt"] = settings["negative"]
    if kind in ("img2img", "inpaint"):
        options["image"] = settings["image"]
        options["strength"] = settings["strength"]
    if kind == "inpaint":
        options["mask_image"] = settings["mask"]
    prompt = [] if system == "ldm-uncond" else [settings["prompt"]]
    started = time.perf_counter()

    if system == "vq-diffusion":
        grid = (pipe.transformer.config.height, pipe.transformer.config.width)

        def vq_step(i, t, codes):
            masked = codes == pipe.scheduler.mask_class
            image = pipe.vqvae.decode_indices(codes.masked_fill(masked, 0), grid)
            pixels = to_pixels(image)
            cell = pixels.shape[0] // grid[0]
            shown = masked[0].reshape(grid).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
            pixels[shown.numpy()] = 128  # a [MASK] position: gray
            send(
                {"step": i, "timestep": int(t), "latents": png(pixels), "masked": int(masked.sum())}
            )

        result = pipe(*prompt, callback=vq_step, **options)
        send(final(result.images[0], started))
        return

    guided = system != "ldm-uncond" and (
        settings["guidance"] != 1.0 if system == "ldm" else settings["guidance"] > 1.0
    )
    steps = StepRecorder(pipe, settings["guidance"], guided)
    recorder = Recorder()
    blocks = [m for m in pipe.unet.modules() if isinstance(m, TransformerBlock)]
    hooks = [block.attn2.register_forward_hook(recorder.record) for block in blocks]
    autoencoder = pipe.vqvae if system != "sd" else pipe.vae
    scale = autoencoder.config.scaling_factor

    def step(i, t, latents):
        with torch.no_grad():
            current = to_pixels(autoencoder.decode(latents[:1].float() / scale))
            x0 = to_pixels(autoencoder.decode(steps.x0[:1] / scale))
        send({"step": i, "timestep": float(t), "latents": png(current), "x0": png(x0)})

    try:
        result = pipe(*prompt, callback=step, **options)
    finally:
        steps.remove()
        for hook in hooks:
            hook.remove()
    image = result.images[0]
    answer = final(image, started)
    if recorder.maps:
        answer["attention"] = attention_answer(pipe, settings["prompt"], recorder, image)
    send(answer)


def final(image, started: float) -> dict:
    return {"done": True, "image": png(np.asarray(image)), "seconds": time.perf_counter() - started}


def attention_answer(pipe, prompt: str, recorder: Recorder, image) -> dict:
    """Each token's map (normalised to its own peak, as a gray PNG) and share of the attention."""
    total = recorder.total(image.height, image.width)  # (L, H, W)
    mass = total.sum(dim=(1, 2))
    share = (mass / mass.sum()).tolist()
    ids = pipe.tokenizer.encode(prompt)
    end = len(ids) - 1
    tokens = []
    for position in range(1, end):
        heat = total[position] / total[position].max().clamp(min=1e-12)
        tokens.append(
            {
                "token": pipe.tokenizer.decode([ids[position]]),
                "share": share[position],
                "map": png((heat * 255).round().byte().numpy()),
            }
        )
    return {
        "tokens": tokens,
        "start": share[0],
        "end": share[end],
        "padding": sum(share[end + 1 :]),
    }


# --- the server --------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    explorer: Explorer  # set by serve()
    allowed_hosts: set  # Host headers this server answers

    def log_message(self, format, *args):  # noqa: A002 - the standard library's name
        pass  # quiet: the terminal shows the address and errors only

    def host_allowed(self) -> bool:
        if self.headers.get("Host", "") in self.allowed_hosts:
            return True
        self.answer(HTTPStatus.FORBIDDEN, {"error": "this server answers only its own address"})
        return False

    def answer(self, status: HTTPStatus, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - the standard library's name
        if not self.host_allowed():
            return
        if self.path in ("/", "/index.html"):
            body = PAGE.read_bytes()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/api/options":
            self.answer(HTTPStatus.OK, self.explorer.options())
        else:
            self.answer(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self):  # noqa: N802
        if not self.host_allowed():
            return
        if self.path != "/api/generate":
            self.answer(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.answer(HTTPStatus.LENGTH_REQUIRED, {"error": "send a Content-Length"})
            return
        if not 0 <= length <= MAX_BODY:
            self.answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"at most {MAX_BODY} bytes"})
            self.close_connection = True
            return
        try:
            settings = read_request(self.rfile.read(length))
        except ValueError as error:
            self.answer(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        explorer = self.explorer
        with explorer.waiting_lock:
            if explorer.waiting > MAX_WAITING:
                self.answer(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    {"error": "busy: another generation is running and others wait; try again"},
                )
                return
            explorer.waiting += 1
        try:
            with explorer.running:
                self.run(settings)
        finally:
            with explorer.waiting_lock:
                explorer.waiting -= 1

    def run(self, settings: dict):
        started = []  # the streamed answer's headers, once sent

        def send(payload: dict):
            if not started:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                started.append(True)
            try:
                self.wfile.write(json.dumps(payload).encode() + b"\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                raise ClientGone from None

        self.close_connection = True  # the streamed answer ends when the connection closes
        try:
            with torch.no_grad():
                generate(self.explorer, settings, send)
        except ClientGone:
            return
        except (ValueError, FloatingPointError) as error:  # the pipelines' own checks
            self.fail(started, HTTPStatus.BAD_REQUEST, str(error), send)
        except Exception as error:  # noqa: BLE001 - a bug: say so, keep serving
            message = f"internal error: {type(error).__name__}: {error} (a bug in minildm)"
            self.fail(started, HTTPStatus.INTERNAL_SERVER_ERROR, message, send)

    def fail(self, started: list, status: HTTPStatus, message: str, send):
        """The error as the answer, or, once steps were streamed, as the stream's last line (the
        page shows either)."""
        if not started:
            self.answer(status, {"error": message})
            return
        try:
            send({"error": message})
        except ClientGone:
            pass


def make_server(host: str, port: int, weights: dict) -> ThreadingHTTPServer:
    """The server, bound (port 0: any free port); serve_forever() runs it."""
    explorer = Explorer(weights)
    handler = type("ExploreHandler", (Handler,), {"explorer": explorer, "allowed_hosts": set()})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    bound = server.server_address[1]
    names = {host, "127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost") else {host}
    handler.allowed_hosts = {f"{name}:{bound}" for name in names}
    return server


def main_explore(args):
    weights = {}
    for item in args.weights or []:
        system, _, folder = item.partition("=")
        if system not in SYSTEMS or not folder:
            raise ValueError(f"--weights {item!r}: expected SYSTEM=FOLDER, SYSTEM one of {SYSTEMS}")
        if not Path(folder).is_dir():
            raise ValueError(f"--weights {item!r}: {folder} is not a folder")
        weights[system] = folder
    torch.set_num_threads(1)  # tiny models: per-op overhead dominates, more threads lose
    server = make_server(args.host, args.port, weights)
    print(f"minildm explore: http://{args.host}:{server.server_address[1]}/  (Ctrl-C stops it)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
