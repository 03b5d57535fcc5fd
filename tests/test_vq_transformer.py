"""VQ-Diffusion transformer and learned classifier-free embeddings: parity with diffusers."""

import json

import pytest
import torch
from conftest import max_relative_error, oracle, randomize_
from safetensors.torch import save_file

import minildm
from minildm.checkpoints.vq_transformer import (
    config_from_diffusers,
    load_learned_embeddings,
    load_vq_transformer,
    split_original_checkpoint,
)
from minildm.vq_transformer import (
    ITHQ,
    LearnedClassifierFreeEmbeddings,
    VQTransformer,
)

TOLERANCE = 1e-4
# the hub's transformer/config.json of microsoft/vq-diffusion-ithq
HUB_CONFIG = dict(
    _class_name="Transformer2DModel",
    _diffusers_version="0.8.0.dev0",
    activation_fn="geglu-approximate",
    attention_bias=True,
    attention_head_dim=88,
    cross_attention_dim=512,
    dropout=0.0,
    in_channels=None,
    norm_num_groups=32,
    num_attention_heads=16,
    num_embeds_ada_norm=100,
    num_layers=36,
    num_vector_embeds=4097,
    sample_size=32,
)
FEW_LAYERS = dict(HUB_CONFIG, num_layers=2)  # full width (16 x 88 = 1408), two of the 36 blocks


def diffusers_transformer(config):
    diffusers = oracle("diffusers")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # diffusers asks for norm_type in the config; the hub file has none
        return diffusers.Transformer2DModel(
            **{k: v for k, v in config.items() if not k.startswith("_")}
        )


def test_full_size_key_coverage_on_meta():
    with torch.device("meta"):
        ours, reference = (
            VQTransformer(config_from_diffusers(HUB_CONFIG)),
            diffusers_transformer(HUB_CONFIG),
        )
        loaded = load_vq_transformer(
            ITHQ,
            {k: torch.empty(v.shape, device="meta") for k, v in reference.state_dict().items()},
            device="meta",
        )
    count = sum(p.numel() for p in ours.parameters())
    print(f"VQ-Diffusion transformer: {count:,} parameters, {len(reference.state_dict())} tensors")
    assert ours.config == ITHQ and count == 1_359_274_624 == sum(
        p.numel() for p in reference.parameters()
    )
    assert isinstance(loaded, VQTransformer)


def inputs(batch=2, seed=0):
    """Half the positions masked (index 4096), half random codes; one timestep for the batch."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 4096, (batch, 1024), generator=g)
    indices[torch.rand(batch, 1024, generator=g) < 0.5] = 4096
    return indices, torch.randn(batch, 77, 512, generator=g)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = randomize_(diffusers_transformer(FEW_LAYERS).eval())
    folder = tmp_path_factory.mktemp("vq") / "transformer"
    model.save_pretrained(folder)
    (folder / "config.json").write_text(
        json.dumps(FEW_LAYERS)
    )  # the hub's config keys (no norm_type)
    return dict(model=model, folder=folder)


@pytest.mark.parametrize("timestep", [0, 37, 99])
def test_log_probs_equal_diffusers(reference, timestep):
    ours = minildm.load_component(reference["folder"])
    indices, context = inputs()
    with torch.no_grad():
        expected = reference["model"](
            indices, encoder_hidden_states=context, timestep=torch.tensor(timestep)
        ).sample
        got = ours(indices, context, timestep)
    error = max_relative_error(got, expected)
    masked = indices[:, None, :].expand_as(got) == 4096
    error_masked = max_relative_error(got[masked], expected[masked])
    error_unmasked = max_relative_error(got[~masked], expected[~masked])
    print(
        f"VQ transformer (1408 wide, 2 layers) t={timestep}: log p(x0) max relative error "
        f"{error:.2e} (tolerance {TOLERANCE:.0e}); "
        f"masked positions {error_masked:.1e}, unmasked {error_unmasked:.1e}"
    )
    assert got.shape == (2, 4096, 1024) and got.dtype == torch.float32 and error < TOLERANCE
    # distributions over the 4096 codes
    assert torch.allclose(got.exp().sum(dim=1), torch.ones(2, 1024), atol=1e-4)


# The original names for each diffusers name, from diffusers'
# scripts/convert_vq_diffusion_to_diffusers.py (written out here, independently of the key map)
def original_name(diffusers_key: str) -> str:
    for new, old in [
        ("latent_image_embedding.", "content_emb."),
        ("transformer_blocks.", "blocks."),
        (".norm1.", ".ln1."),
        (".norm2.", ".ln1_1."),
        (".norm3.", ".ln2."),
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj."),
        (".ff.net.0.proj.", ".mlp.0."),
        (".ff.net.2.", ".mlp.2."),
    ]:
        diffusers_key = diffusers_key.replace(new, old)
    return (
        diffusers_key.replace("norm_out.", "to_logits.0.").replace("out.", "to_logits.1.")
        if diffusers_key.startswith(("norm_out.", "out."))
        else diffusers_key
    )


def test_original_checkpoint_ema_by_default(reference):
    """ithq_learnable.pth: {"model": {transformer.transformer.*, transformer.empty_text_embed
    (float64), other components}, "ema": {transformer.*, empty_text_embed}}; the EMA weights are
    the ones the original samples with."""
    ema_model = reference["model"]
    trained = randomize_(diffusers_transformer(FEW_LAYERS).eval(), seed=5)
    checkpoint = {
        "model": {
            "transformer.transformer." + original_name(k): v
            for k, v in trained.state_dict().items()
        }
        | {
            "transformer.empty_text_embed": torch.zeros(77, 512, dtype=torch.float64),
            "transformer.condition_emb.token_embedding.weight": torch.zeros(3),
            "content_codec.quantize.embedding": torch.zeros(3),
        },
        "ema": {"transformer." + original_name(k): v for k, v in ema_model.state_dict().items()}
        | {"empty_text_embed": torch.ones(77, 512, dtype=torch.float64)},
    }
    indices, context = inputs(seed=1)
    config = config_from_diffusers(FEW_LAYERS)
    for ema, source in ((True, ema_model), (False, trained)):
        transformer_state, embedding_state = split_original_checkpoint(checkpoint, ema=ema)
        ours = load_vq_transformer(config, transformer_state)
        embeddings = load_learned_embeddings({"length": 77, "hidden_size": 512}, embedding_state)
        with torch.no_grad():
            error = max_relative_error(
                ours(indices, context, 10),
                source(indices, encoder_hidden_states=context, timestep=torch.tensor(10)).sample,
            )
        print(f"VQ transformer from the original layout, ema={ema}: max relative error {error:.2e}")
        assert error < TOLERANCE
        assert (
            embeddings.embeddings.dtype == torch.float32
            and embeddings.embeddings.sum().item() == (77 * 512 if ema else 0)
        )
    with pytest.raises(ValueError, match="no 'ema' entry"):
        split_original_checkpoint({"model": checkpoint["model"]})


def test_learned_embeddings_folder(tmp_path):
    values = torch.randn(77, 512)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "LearnedClassifierFreeSamplingEmbeddings",
                "hidden_size": 512,
                "learnable": True,
                "length": 77,
            }
        )
    )
    save_file({"embeddings": values}, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = minildm.load_component(tmp_path)
    assert isinstance(loaded, LearnedClassifierFreeEmbeddings) and torch.equal(
        loaded.embeddings, values
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "LearnedClassifierFreeSamplingEmbeddings", "learnable": False})
    )
    with pytest.raises(ValueError, match="not learnable"):
        minildm.load_component(tmp_path)


def test_bfloat16_log_probs(reference):
    ours32 = minildm.load_component(reference["folder"])
    ours16 = minildm.load_component(reference["folder"], dtype=torch.bfloat16)
    indices, context = inputs()
    with torch.no_grad():
        expected, got = ours32(indices, context, 50), ours16(indices, context.bfloat16(), 50)
    error = max_relative_error(got, expected)
    same_argmax = (got.argmax(dim=1) == expected.argmax(dim=1)).float().mean().item()
    print(
        f"VQ transformer bf16 vs fp32: log p(x0) max relative error {error:.2e} (tolerance 5e-2), "
        f"most likely code equal at {same_argmax:.1%} of positions"
    )
    assert (
        got.dtype == torch.float32 and error < 5e-2
    )  # the log-softmax itself always runs in float64


def test_bad_input_is_refused():
    with torch.device("meta"):
        model = VQTransformer(ITHQ)
    context = torch.zeros(1, 77, 512, device="meta")
    with pytest.raises(ValueError, match=r"LongTensor \(B, 1024\) for a 32x32 grid"):
        model(torch.zeros(1, 1023, dtype=torch.long), context, 0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4096\]"):
        model(torch.full((1, 1024), 4097), context, 0)
    with pytest.raises(ValueError, match=r"context of shape \(1, L, 512\)"):
        model(torch.zeros(1, 1024, dtype=torch.long), torch.zeros(1, 77, 768), 0)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 100\)"):
        model(torch.zeros(1, 1024, dtype=torch.long), torch.zeros(1, 77, 512), 100)
    with pytest.raises(ValueError, match="continuous inputs"):
        config_from_diffusers(dict(HUB_CONFIG, num_vector_embeds=None))
