"""How official checkpoint files become minildm's modules: a porter's page.

minildm names its modules for the reader (`down.1.attentions.0.block.attn2.q`), not as any
checkpoint does, so every weight file is read through a key map. The model files (minildm/unet.py,
...) hold only the math; everything that knows a file layout lives here, one file per model under
the model's own name:

    checkpoints/unet.py            UNet                  diffusers, CompVis openaimodel (+ EMA)
    checkpoints/autoencoder.py     AutoencoderKL/VQModel diffusers (modern, 2022), CompVis/taming
    checkpoints/clip.py            CLIPText/VisionModel  transformers (hub, v5), SD's cond_stage
    checkpoints/ldm_bert.py        LDMBert               diffusers LDMBertModel, x-transformers
    checkpoints/vq_transformer.py  VQTransformer         diffusers Transformer2DModel, microsoft
    checkpoints/safety_checker.py  SafetyChecker         diffusers StableDiffusionSafetyChecker

Each holds `config_from_diffusers(config.json dict) -> the model's config` and (where minildm
writes folders) `config_to_diffusers(config) -> dict` (CLIP: `text_config_from_diffusers`,
`text_config_to_diffusers`, `vision_config_from_diffusers`; VQ-Diffusion's learned embeddings:
`embeddings_config_from_diffusers`); the key-map rules; the hints printed when weights do not fit;
and the loader (`load_unet`, `load_autoencoder`, `load_clip_text_model`, ...), which builds the
model on the meta device, loads strictly, and hands it to cpu_speed's `speed_up`. Beside them:

    checkpoints/weights.py   reading .safetensors/.bin/.ckpt safely, finding files (folder, hub
                             cache), `remap_keys` / `rename_keys` / `load_into` (strict, with the
                             file's own names in errors), the 2022 diffusers attention names
                             (`legacy_attention_name`) and 1x1-conv attention weights
                             (`squeeze_attention_weights`)
    checkpoints/load.py      `load_component(folder)`: config.json's class -> the loader above;
                             tokenizers, schedulers, `split_stable_diffusion_checkpoint`
    checkpoints/download.py  weights_manifest.txt's files, fetched, resumed and verified
    checkpoints/lora.py      LoRA files (diffusers/PEFT and kohya-ss layouts) <-> the updates of
                             minildm/lora.py: `read_lora`, `apply_lora`, `write_lora`
    checkpoints/embeddings.py  textual-inversion files (diffusers, AUTOMATIC1111, kohya-ss):
                             `read_embedding`, `write_embedding`

How names correspond, minildm <-> diffusers / transformers <-> the original repository (produced
by the functions named; `model.diffusion_model.`, `first_stage_model.` and
`cond_stage_model.transformer.` are the prefixes inside a whole CompVis SD/LDM checkpoint).

UNet (checkpoints/unet.py: `diffusers_name`, `original_name`, `file_names`; SD v1):
    down.1.attentions.0.block.attn2.q.weight
        <-> down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight
        <-> model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight
    down.0.resnets.1.time_proj.weight
        <-> down_blocks.0.resnets.1.time_emb_proj.weight
        <-> model.diffusion_model.input_blocks.2.0.emb_layers.1.weight
    down.2.resample.conv.weight
        <-> down_blocks.2.downsamplers.0.conv.weight
        <-> model.diffusion_model.input_blocks.9.0.op.weight
    up.3.resnets.0.shortcut.weight
        <-> up_blocks.3.resnets.0.conv_shortcut.weight
        <-> model.diffusion_model.output_blocks.9.0.skip_connection.weight
    time_embedding.linear1.weight <-> time_embedding.linear_1.weight <-> ...time_embed.0.weight
    norm_out.weight <-> conv_norm_out.weight <-> model.diffusion_model.out.0.weight
  CelebA-HQ's self-attention blocks (diffusers' 2022 name from `legacy_attention_name`; CompVis
  fuses q, k, v in one `qkv`, cut head by head by `split_fused_qkv`):
    down.1.attentions.0.q.weight
        <-> down_blocks.1.attentions.0.to_q.weight (2022: ...attentions.0.query.weight)
        <-> model.diffusion_model.input_blocks.4.1.qkv.weight (its q rows)
    mid.attention.out.weight
        <-> mid_block.attentions.0.to_out.0.weight (2022: ...attentions.0.proj_attn.weight)
        <-> model.diffusion_model.middle_block.1.proj_out.weight
  Full-EMA CompVis files also hold `model_ema.diffusion_modelinput_blocks41...` (`select_ema`).

Autoencoders (checkpoints/autoencoder.py: `diffusers_name`, `original_name`, `file_names`):
    encoder.mid.attention.q.weight
        <-> encoder.mid_block.attentions.0.to_q.weight (2022: ...attentions.0.query.weight)
        <-> first_stage_model.encoder.mid.attn_1.q.weight
    encoder.levels.1.resnets.0.shortcut.weight
        <-> encoder.down_blocks.1.resnets.0.conv_shortcut.weight
        <-> first_stage_model.encoder.down.1.block.0.nin_shortcut.weight
    decoder.levels.3.resample.conv.weight (decoder levels count from the lowest resolution)
        <-> decoder.up_blocks.3.upsamplers.0.conv.weight
        <-> first_stage_model.decoder.up.0.upsample.conv.weight (CompVis: from the highest)
    codebook.weight <-> quantize.embedding.weight <-> quantize.embedding.weight

CLIP text (checkpoints/clip.py: `KEY_RULES`, its inverse `transformers_name`; OpenAI CLIP's own
names appear only in the original repository, SD checkpoints store transformers' under
`cond_stage_model.transformer.`):
    layers.11.attn.q.weight
        <-> text_model.encoder.layers.11.self_attn.q_proj.weight
        <-> cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight
    layers.0.mlp_norm.bias <-> text_model.encoder.layers.0.layer_norm2.bias
    token_embedding.weight <-> text_model.embeddings.token_embedding.weight
    final_norm.weight <-> text_model.final_layer_norm.weight
  CLIP vision (`VISION_KEY_RULES`): class_embedding <-> vision_model.embeddings.class_embedding;
    pre_norm.weight <-> vision_model.pre_layrnorm.weight (sic);
    layers.23.attn.out.weight <-> vision_model.encoder.layers.23.self_attn.out_proj.weight
  Safety checker (checkpoints/safety_checker.py `KEY_RULES`): vision_model.layers.0.mlp.fc1.weight
    <-> vision_model.vision_model.encoder.layers.0.mlp.fc1.weight (transformers 4's hub file);
    concept_thresholds <-> concept_embeds_weights

LDMBert (checkpoints/ldm_bert.py: `KEY_RULES` for both layouts, `diffusers_name`):
    layers.3.attn.q.weight
        <-> model.layers.3.self_attn.q_proj.weight
        <-> cond_stage_model.transformer.attn_layers.layers.6.1.to_q.weight
    layers.3.mlp.fc2.weight
        <-> model.layers.3.fc2.weight
        <-> cond_stage_model.transformer.attn_layers.layers.7.1.net.2.weight
    token_embedding.weight <-> model.embed_tokens.weight <-> ...transformer.token_emb.weight

VQ-Diffusion (checkpoints/vq_transformer.py: `KEY_RULES` for both layouts, `diffusers_name`;
microsoft/VQ-Diffusion's ithq_learnable.pth after `split_original_checkpoint`):
    blocks.5.attn2.q.weight
        <-> transformer_blocks.5.attn2.to_q.weight
        <-> transformer.transformer.blocks.5.attn2.query.weight
    blocks.5.norm2.linear.weight
        <-> transformer_blocks.5.norm2.linear.weight
        <-> transformer.transformer.blocks.5.ln1_1.linear.weight
    token_embedding.weight
        <-> latent_image_embedding.emb.weight
        <-> transformer.transformer.content_emb.emb.weight
    out.weight <-> out.weight <-> transformer.transformer.to_logits.1.weight

This __init__ imports nothing: `from minildm.checkpoints.unet import load_unet` loads only what
the UNet's checkpoints need.
"""
