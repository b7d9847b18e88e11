#!/usr/bin/env python3
"""Export SAM3 (HF transformers `Sam3Model`) to three ONNX graphs + tokenizer.json + manifest.json.

Graphs (opset 17, legacy TorchScript exporter, fp32 float inputs/outputs in every precision, uint8 image and masks):
  vision.onnx   image_u8 u8 [B,S,S,3] (the resized photo; normalised in the graph, image_input.py)
                or with --image-input f32: pixel_values f32 [B,3,S,S]
                                                               -> fpn_0 [B,C,M,M], fpn_1 [B,C,M/2,M/2], fpn_2 [B,C,M/4,M/4]
  text.onnx     input_ids, attention_mask i64 [N,32]           -> text_features f32 [N,32,D]
  decoder.onnx  fpn_0..2 of ONE image (batch 1), text_features [N,32,D], text_mask i64 [N,32]
                -> topk_masks u8 [N,K,M,M] (round(σ(logit)·255), mask_output.py; --mask-output f32: the logits),
                   topk_boxes [N,K,4] (xyxy in [0,1]), topk_logits [N,K], topk_queries i64 [N,K],
                   presence_logits [N,1], semantic_seg [N,1,M,M] (same dtype as the masks)
with S = image size, M = 4*S/14, C = FPN channels, D = text feature dim, Q = queries, K = min(--topk, Q) (default 20):
the decoder keeps its best K queries by logit, best first, so the dense [N,Q,M,M] masks (66 MB per phrase at full
size) stay inside ONNX Runtime. --topk 0 exports the dense outputs instead (pred_masks [N,Q,M,M], pred_boxes,
pred_logits [N,Q]); the server reads both forms.
Attention in the vision and decoder graphs is one com.microsoft MultiHeadAttention node per block (fused_attention.py:
ONNX Runtime's fused kernels, no [B,H,S,L] score tensor); --attention eager keeps the traced MatMul/Softmax form.

Usage:
  # the real model (gated: HF_TOKEN must hold a token with access), or a local snapshot directory
  HF_TOKEN=hf_... python export_sam3.py --model facebook/sam3 --revision main --out /models/sam3
  python export_sam3.py --model /path/to/sam3-snapshot --out /models/sam3 --precision fp16

  # random weights, no download (tiny = the committed test model, exported with --topk 16; full = Sam3Config();
  # mid = image 504 with the real DETR widths, for CPU measurements at real-ish sequence lengths)
  python export_sam3.py --random-init tiny --seed 0 --topk 16 --out ../models/sam3-tiny

  # parity: PyTorch vs ONNX Runtime (CPU) on real images; writes reference fixtures, fails on disagreement
  python export_sam3.py --random-init tiny --seed 0 --topk 16 --out ../models/sam3-tiny \
      --parity-out /tmp/parity --images a.jpg b.png --concepts wall floor sofa --score-threshold 0.5
  python export_sam3.py ... --parity-out ../tests/fixtures/reference --cases fixture_cases.json

The CLIP BPE merges file (bpe_simple_vocab_16e6.txt.gz) is needed to build tokenizer.json. Pass --clip-bpe PATH, or
let the script find it: it looks next to this script, then in /tmp/oc for the open-clip-torch wheel fetched with
    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
and reads open_clip/bpe_simple_vocab_16e6.txt.gz out of the wheel (a zip). open-clip-torch itself is NOT installed:
it drags in heavy dependencies and only this one data file is needed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

import check_onnx
import fp16
import fused_attention
import fused_layers
import fused_rope
import image_input as image_input_graph
import mask_output as mask_output_graph
import sam3_common as common

HERE = Path(__file__).resolve().parent
TINY_IMAGE_SIZE = 168
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
OPEN_CLIP_WHEEL_GLOB = "open_clip_torch-3.3.0-*.whl"


# ----------------------------------------------------------------------------------------------------------- tokenizer

def find_clip_bpe(explicit: str | None) -> bytes:
    if explicit:
        return Path(explicit).read_bytes()
    local = HERE / BPE_NAME
    if local.exists():
        return local.read_bytes()
    for wheel_dir in (Path("/tmp/oc"), HERE / ".oc"):
        for wheel in sorted(wheel_dir.glob(OPEN_CLIP_WHEEL_GLOB)):
            with zipfile.ZipFile(wheel) as zf:
                return zf.read(f"open_clip/{BPE_NAME}")
    raise SystemExit(
        f"CLIP BPE vocab not found: pass --clip-bpe PATH/{BPE_NAME}, or run\n"
        "  pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc\n"
        "and the script reads it out of the wheel."
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table (same as CLIP's simple_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_tokenizer(bpe_gz: bytes):
    """A `tokenizers` CLIP BPE tokenizer equivalent to CLIP's SimpleTokenizer (minus ftfy's mojibake repair).

    Vocab layout (49408): 256 byte chars, the same + '</w>', 48894 merges, <|startoftext|>, <|endoftext|>.
    No truncation or padding is configured: the consumer truncates to 32 keeping EOS last and pads.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == common.VOCAB_SIZE, len(vocab)
    vocab_ids = {tok: i for i, tok in enumerate(vocab)}

    tok = Tokenizer(BPE(vocab=vocab_ids, merges=merges, unk_token="<|endoftext|>", continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", common.BOS_ID), ("<|endoftext|>", common.EOS_ID)])
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)])
    # BOS/EOS are NOT registered as added tokens: a concept containing the literal text "<|endoftext|>" must be
    # split as plain text (as CLIP's own tokenizer does), not smuggle an EOS into the middle of the prompt.
    return tok


# --------------------------------------------------------------------------------------------------------------- model

def tiny_config():
    from transformers import Sam3Config, Sam3ViTConfig, Sam3VisionConfig

    d = 32  # DETR / FPN / mask-decoder width
    m = common.mask_size(TINY_IMAGE_SIZE)
    # 12x12 patches, 6x6 pretrain position table tiled 2x2 and 6x6 windows: the same structure as the real
    # 72x72 / 24x24 / 24 (tiling, windowed + global layers), at 1/6 the side.
    vit = Sam3ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                        image_size=TINY_IMAGE_SIZE, patch_size=14, pretrain_image_size=84, window_size=6,
                        global_attn_indexes=[1, 3])
    return Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=d,
                                       backbone_feature_sizes=[[m, m], [m // 2, m // 2], [m // 4, m // 4]]),
        # Real vocab (49408 rows) so the real tokenizer drives it; 32-d keeps the embedding at 6 MB.
        text_config={
            "vocab_size": common.VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 128, "projection_dim": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": common.CONTEXT_LENGTH,
            "hidden_act": "gelu",
        },
        geometry_encoder_config={"hidden_size": d, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        detr_encoder_config={"hidden_size": d, "num_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        detr_decoder_config={"hidden_size": d, "num_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                             "num_queries": 20},
        mask_decoder_config={"hidden_size": d, "num_attention_heads": 2},
    )


def mid_config():
    """Between tiny and full, for CPU measurements where sequence length matters (attention): image 504 (36x36
    patches, 1296 tokens; the real model has 72x72), a 8-layer 256-d ViT with head size 64 as the real one, 12x12
    windows and 2 global layers; the real DETR/mask-decoder widths (256, 8 heads, 6 + 6 layers, 200 queries)."""
    from transformers import Sam3Config, Sam3ViTConfig, Sam3VisionConfig

    s, d = 504, 256
    m = common.mask_size(s)
    vit = Sam3ViTConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                        image_size=s, patch_size=14, pretrain_image_size=168, window_size=12,
                        global_attn_indexes=[3, 7])
    return Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=d,
                                       backbone_feature_sizes=[[m, m], [m // 2, m // 2], [m // 4, m // 4]]),
        text_config={
            "vocab_size": common.VOCAB_SIZE, "hidden_size": 256, "intermediate_size": 1024, "projection_dim": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": common.CONTEXT_LENGTH,
            "hidden_act": "gelu",
        },
        geometry_encoder_config={"hidden_size": d, "num_layers": 1, "num_attention_heads": 8, "intermediate_size": 512},
    )


def fan_in_reinit(model, seed: int) -> None:
    """Replace HF's std-0.02 init (mask logits ~1e-3) with fan-in scaled weights so every output is O(1).

    Linear/conv weights ~ N(0, 1/fan_in), biases 0, norms identity, embeddings N(0, 1). Three nudges make the
    scores look like a detector's instead of a constant per concept (measured on the tiny config):
    - the DETR decoder is post-LN, so full-size residual branches wash out the query identity within two layers
      (pred_logits std across queries 0.1); branches (attention o_proj, MLP fc2) at 1/4 keep it (std ~0.6);
    - the scoring query projection x3 spreads pred_logits to std ~1.5-2;
    - the presence head's last bias +2 puts σ(presence) near 0.8, so some σ(logit)·σ(presence) clear 0.5
      (otherwise about half the concepts would be "absent" and nothing kept).
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)

    def normal_(t, std):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * std)

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            normal_(module.weight, fan_in ** -0.5)
        elif isinstance(module, nn.ConvTranspose2d):
            # weight [in, out, k, k] with stride == kernel: each output pixel sees in_channels inputs.
            normal_(module.weight, module.weight.shape[0] ** -0.5)
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, 1.0)
        elif isinstance(module, nn.LayerNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
                module.bias.fill_(0.0)
        else:
            continue
        if getattr(module, "bias", None) is not None and not isinstance(module, nn.LayerNorm):
            with torch.no_grad():
                module.bias.zero_()
    # Free-standing parameters (the ViT's absolute position table).
    emb = model.vision_encoder.backbone.embeddings
    normal_(emb.position_embeddings, 0.5)
    with torch.no_grad():
        for name, module in model.detr_decoder.layers.named_modules():
            if name.endswith("o_proj") or name.endswith("mlp.fc2"):
                module.weight.mul_(0.25)
        model.dot_product_scoring.query_proj.weight.mul_(3.0)
        model.detr_decoder.presence_head.layer3.bias.fill_(2.0)


def load_model(args):
    """Returns (model, info) with info = source_model, source_revision, random_init, seed."""
    import torch
    from transformers import Sam3Config, Sam3Model

    if args.random_init:
        torch.manual_seed(args.seed)
        config = {"tiny": tiny_config, "mid": mid_config, "full": Sam3Config}[args.random_init]()
        config._attn_implementation = "eager"
        model = Sam3Model(config)
        fan_in_reinit(model, args.seed)
        info = {"source_model": "random", "source_revision": "", "random_init": args.random_init, "seed": args.seed}
    else:
        token = os.environ.get("HF_TOKEN") or None
        try:
            model, loading = Sam3Model.from_pretrained(args.model, revision=args.revision, token=token,
                                                       attn_implementation="eager", dtype=torch.float32,
                                                       output_loading_info=True)
        except OSError as e:
            # transformers' message names the repo but not what to do here (a gated repo: 401/403).
            raise SystemExit(
                f"cannot load {args.model} (revision {args.revision or 'main'}): {e}\n"
                f"HF_TOKEN is {'set' if token else 'NOT set'}. facebook/sam3 is gated: request access on its "
                "Hugging Face page with your account, then set HF_TOKEN to a read token of that account "
                "(or log in with `hf auth login`).") from None
        check_loading(loading)
        info = {"source_model": args.model, "source_revision": resolve_revision(model, args, token),
                "random_init": None, "seed": None}
    model.eval()
    return model, info


def check_loading(loading: dict) -> None:
    """Stops the export when checkpoint weights did not land in the model: a missing or mismatched key would be left
    at its random initialisation, and the PyTorch check (same model on both sides) would still pass."""
    missing = list(loading.get("missing_keys") or [])
    mismatched = [k if isinstance(k, str) else k[0] for k in loading.get("mismatched_keys") or []]
    if missing or mismatched:
        raise SystemExit(
            f"the checkpoint does not fill the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(mismatched)} mismatched {mismatched[:5]}: a transformers version this exporter does not know? "
            "(requirements.txt pins the one it was written for)")
    unexpected = loading.get("unexpected_keys") or []
    if unexpected:
        # The checkpoint also holds the video tracker's weights, which the image model does not use.
        print(f"  {len(unexpected)} checkpoint keys unused by the image model (e.g. {list(unexpected)[:3]})", flush=True)


def resolve_revision(model, args, token) -> str:
    """The commit the weights came from: HF's commit hash, a cache snapshot folder's name, or what was asked for."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    local = Path(args.model)
    if local.is_dir():
        return local.resolve().name if local.resolve().parent.name == "snapshots" else (args.revision or "")
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(args.model, revision=args.revision, token=token).sha or (args.revision or "")
    except Exception as e:  # offline or no access: the export itself already succeeded
        print(f"could not resolve the commit of {args.model}@{args.revision}: {e}", file=sys.stderr)
        return args.revision or ""


def model_dims(model) -> dict:
    cfg = model.config
    return {
        "image_size": int(cfg.vision_config.backbone_config.image_size),
        "fpn_channels": int(cfg.vision_config.fpn_hidden_size),
        "text_feature_dim": int(cfg.detr_encoder_config.hidden_size),
        "num_queries": int(cfg.detr_decoder_config.num_queries),
    }


def wrappers(model, topk: int = 0):
    import torch
    from torch import nn
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.sam3.modeling_sam3 import Sam3SinePositionEmbedding, Sam3VisionEncoderOutput

    # HF caches this function on the shape tuple; under tracing a cached tensor would be baked in as a constant with
    # the example batch size. Call the uncached function so the graph computes the encoding for the runtime N.
    build_pos = getattr(Sam3SinePositionEmbedding.build_sine_position_embedding, "__wrapped__",
                        Sam3SinePositionEmbedding.build_sine_position_embedding)

    class Vision(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model.vision_encoder

        def forward(self, pixel_values):
            fpn = self.encoder(pixel_values).fpn_hidden_states
            return fpn[0], fpn[1], fpn[2]  # the 4th (0.5x) level is unused by the detector

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.topk = topk
            pe = model.vision_encoder.neck.position_encoding
            self.pe_args = (pe.num_position_features, pe.normalize, pe.scale, pe.temperature)

        def forward(self, fpn_0, fpn_1, fpn_2, text_features, text_mask):
            n = text_features.shape[0]
            fpn = [f.expand(n, -1, -1, -1) for f in (fpn_0, fpn_1, fpn_2)]
            pos = [build_pos(f.shape, f.device, f.dtype, *self.pe_args) for f in fpn]
            # Sam3Model.forward drops the last FPN level ([:-1]); pass a placeholder 4th level it never reads.
            vision = Sam3VisionEncoderOutput(fpn_hidden_states=tuple(fpn) + (fpn[-1],),
                                             fpn_position_encoding=tuple(pos) + (pos[-1],))
            out = self.model(vision_embeds=vision, text_embeds=BaseModelOutputWithPooling(pooler_output=text_features),
                             attention_mask=text_mask)
            if not self.topk:
                return out.pred_masks, out.pred_boxes, out.pred_logits, out.presence_logits, out.semantic_seg
            # Ranking by logit ranks by score too: σ(presence) is one positive factor per phrase.
            q = out.pred_logits.shape[1]
            logits, idx = torch.topk(out.pred_logits, self.topk, dim=1)
            # Gather as rows of [N*Q, ...] (ONNX Gather with an [N*K] index) rather than torch.gather, whose ONNX
            # GatherElements needs an index as large as the [N,K,M,M] result.
            flat = (idx + torch.arange(n, device=idx.device)[:, None] * q).reshape(-1)
            m = out.pred_masks.shape[2:]
            masks = out.pred_masks.reshape(n * q, -1).index_select(0, flat).reshape(n, self.topk, *m)
            boxes = out.pred_boxes.reshape(n * q, 4).index_select(0, flat).reshape(n, self.topk, 4)
            return masks, boxes, logits, idx, out.presence_logits, out.semantic_seg

    return Vision().eval(), Text().eval(), Decoder().eval()


# -------------------------------------------------------------------------------------------------------------- export

def _fix_io_shapes(onnx_model, spec: dict) -> None:
    """Write the contract's names/shapes onto graph inputs/outputs (the tracer leaves symbols like 'Addfpn_0_dim_2')."""
    graph = onnx_model.graph
    for kind, values in (("inputs", graph.input), ("outputs", graph.output)):
        by_name = {v.name: v for v in values}
        assert list(by_name) == [x["name"] for x in spec[kind]], (kind, list(by_name))
        for x in spec[kind]:
            shape = by_name[x["name"]].type.tensor_type.shape
            del shape.dim[:]
            for d in x["shape"]:
                dim = shape.dim.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d


def export_graphs(model, out: Path, precision: str, opset: int, topk: int, image_input: str,
                  attention: str = "fused", mask_output: str = "u8", rope: str = "fused",
                  layers: str = "plain") -> dict:
    import onnx
    import torch

    dims = model_dims(model)
    # The tracer sees the float32 CHW input and logits the PyTorch model has; the u8 input and mask outputs are added
    # to the traced graph.
    traced = common.graph_contract(**dims, topk=topk)
    contract = common.graph_contract(**dims, topk=topk, image_input=image_input, masks=mask_output)
    s, t = dims["image_size"], common.CONTEXT_LENGTH
    vision, text, decoder = wrappers(model, topk)

    # Example size 2 for every dynamic dim (size 1 gets specialised away by the exporters).
    gen = torch.Generator().manual_seed(1234)
    pixel_values = torch.rand(2, 3, s, s, generator=gen) * 2 - 1
    input_ids = torch.full((2, t), common.PAD_ID, dtype=torch.long)
    input_ids[:, 0] = common.BOS_ID
    input_ids[0, 1:3] = torch.tensor([2569, common.EOS_ID])
    input_ids[1, 1:4] = torch.tensor([4125, 15723, common.EOS_ID])
    attention_mask = (torch.arange(t)[None, :] < torch.tensor([[3], [4]])).long()
    with torch.no_grad():
        fpn = vision(pixel_values[:1])
        text_features = text(input_ids, attention_mask)

    jobs = {
        "vision": (vision, (pixel_values,), {"pixel_values": {0: "B"}, "fpn_0": {0: "B"}, "fpn_1": {0: "B"},
                                             "fpn_2": {0: "B"}}),
        "text": (text, (input_ids, attention_mask), {"input_ids": {0: "N"}, "attention_mask": {0: "N"},
                                                    "text_features": {0: "N"}}),
        "decoder": (decoder, (*fpn, text_features, attention_mask),
                    {"text_features": {0: "N"}, "text_mask": {0: "N"},
                     **{name: {0: "N"} for name in common.decoder_output_names(topk)}}),
    }
    graphs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (module, example, dynamic_axes) in jobs.items():
            spec, traced_spec = contract[name], traced[name]
            raw = Path(tmp) / f"{name}.onnx"
            t0 = time.time()
            with torch.no_grad(), warnings.catch_warnings():
                # TracerWarnings flag Python-side shape arithmetic that is constant for fixed S (checked by parity).
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based exporter": chosen
                torch.onnx.export(module, example, str(raw), input_names=[x["name"] for x in traced_spec["inputs"]],
                                  output_names=[x["name"] for x in traced_spec["outputs"]], dynamic_axes=dynamic_axes,
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
            onnx_model = onnx.load(str(raw))  # pulls in external data if the exporter wrote any
            if attention == "fused" and name in fused_attention.FUSED_GRAPHS:
                blocks = fused_attention.fuse_attention(onnx_model)
                print(f"  {name}: {blocks} attention blocks fused into MultiHeadAttention", flush=True)
                if blocks == 0:
                    # The manifest would say "fused" over eager graphs: the model did not trace as eager attention
                    # (a transformers version that ignores attn_implementation?), so nothing matched.
                    raise SystemExit(f"{name}: no attention block matched for fusing; export with --attention eager "
                                     "or use the transformers version of requirements.txt")
                if rope == "fused" and name == "vision":
                    # In memory, before the fp16 conversion and the save: the fp32 full-size vision graph goes to
                    # external data on disk, which fused_rope.py's file converter does not take.
                    fused = fused_rope.fuse_rope(onnx_model)
                    print(f"  {name}: {fused['rope']} RoPE applications fused into RotaryEmbedding", flush=True)
                    if fused["rope"] == 0:
                        raise SystemExit(f"{name}: no RoPE matched for fusing; export with --rope traced")
                if layers == "fused":
                    # In memory too, for the same reason; the projections are packed per MultiHeadAttention node.
                    fused = fused_layers.fuse_layers(onnx_model)
                    print(f"  {name}: layers fused {fused}", flush=True)
                    if fused["skip_layernorm"] == 0:
                        raise SystemExit(f"{name}: no residual LayerNorm matched for fusing; "
                                         "export with --layers plain")
            if precision == "fp16":
                onnx_model = fp16.to_fp16(onnx_model, name)
            if name == "vision" and image_input == "u8":
                image_input_graph.to_u8_input(onnx_model, common.IMAGE_MEAN, common.IMAGE_STD)
            if name == "decoder" and mask_output == "u8":
                mask_output_graph.to_u8_masks(onnx_model)
            _fix_io_shapes(onnx_model, spec)
            path = out / f"{name}.onnx"
            external = common.save_onnx(onnx_model, path)
            del onnx_model
            entry = {"file": path.name, "sha256": common.sha256_file(path), **spec}
            if external:
                entry["external_data"] = [{"file": p.name, "sha256": common.sha256_file(p)} for p in external]
            graphs[name] = entry
            print(f"exported {name}.onnx ({path.stat().st_size / 1e6:.2f} MB, {time.time() - t0:.1f} s)", flush=True)
    return graphs


def write_manifest(out: Path, info: dict, dims: dict, precision: str, opset: int, graphs: dict, topk: int,
                   attention: str = "fused", rope: str = "traced", layers: str = "plain") -> dict:
    import torch
    import transformers

    tok = out / "tokenizer.json"
    manifest = {
        "format": common.FORMAT,
        "format_version": common.FORMAT_VERSION,
        **info,
        "precision": precision,
        "opset": opset,
        "attention": attention,
        **({"rope": "fused"} if rope == "fused" and attention == "fused" else {}),
        **({"layers": "fused"} if layers == "fused" and attention == "fused" else {}),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "image_size": dims["image_size"],
        "image_mean": common.IMAGE_MEAN,
        "image_std": common.IMAGE_STD,
        "resize": common.RESIZE,
        "mask_size": common.mask_size(dims["image_size"]),
        "num_queries": dims["num_queries"],
        "decoder_topk": topk,
        "text_context_length": common.CONTEXT_LENGTH,
        "text_feature_dim": dims["text_feature_dim"],
        "fpn_channels": dims["fpn_channels"],
        "session_hints": fp16.session_hints(precision),
        "tokenizer": {"file": tok.name, "sha256": common.sha256_file(tok), "bos_id": common.BOS_ID,
                      "eos_id": common.EOS_ID, "pad_id": common.PAD_ID},
        "graphs": graphs,
    }
    common.write_json(out / "manifest.json", manifest)
    return manifest


# -------------------------------------------------------------------------------------------------------------- parity

def torch_reference(model, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict:
    """The unmodified HF path: vision features once, expanded to N prompts, then Sam3Model.forward with input_ids."""
    import torch
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    n = input_ids.shape[0]
    with torch.no_grad():
        vis = model.get_vision_features(pixel_values=torch.from_numpy(pixel_values))
        vis = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(f.expand(n, -1, -1, -1) for f in vis.fpn_hidden_states),
            fpn_position_encoding=tuple(p.expand(n, -1, -1, -1) for p in vis.fpn_position_encoding),
        )
        out = model(vision_embeds=vis, input_ids=torch.from_numpy(input_ids),
                    attention_mask=torch.from_numpy(attention_mask))
    return {k: getattr(out, k).float().numpy() for k in common.OUTPUT_NAMES}


def ort_sessions(model_dir: Path) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return {g: ort.InferenceSession(str(model_dir / f"{g}.onnx"), opts, providers=["CPUExecutionProvider"])
            for g in ("vision", "text", "decoder")}


def ort_run(sessions: dict, pixel_values, input_ids, attention_mask) -> dict:
    fpn = check_onnx.run_vision(sessions, pixel_values)
    (text_features,) = sessions["text"].run(["text_features"], {"input_ids": input_ids,
                                                               "attention_mask": attention_mask})
    return check_onnx.run_decoder(sessions, fpn, text_features, attention_mask)


def tolerance(precision: str, ref: np.ndarray) -> float:
    # fp32 ORT vs PyTorch differ by kernel order only; fp16 graphs carry ~1e-3 relative rounding per op.
    atol, rtol = (1e-4, 1e-4) if precision == "fp32" else (5e-2, 5e-2)
    return atol + rtol * float(np.abs(ref).max())


def run_parity(model, model_dir: Path, cases: list[dict], parity_out: Path, precision: str, topk: int) -> bool:
    tokenizer = common.load_tokenizer(model_dir / "tokenizer.json")
    size = model_dims(model)["image_size"]
    sessions = ort_sessions(model_dir)
    ok = True
    parity_out.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases, start=1):
        image_path = Path(case["image"]).resolve()
        image = common.load_oriented_rgb(image_path)
        pixel_values = common.preprocess(image, size)
        input_ids, attention_mask, lengths = common.tokenize(tokenizer, case["concepts"])
        ref = torch_reference(model, pixel_values, input_ids, attention_mask)
        got = ort_run(sessions, pixel_values, input_ids, attention_mask)
        # The fixtures keep PyTorch's dense outputs; a top-k graph is compared with them at the queries it kept, and
        # the queries it kept with PyTorch's top k (near-ties, fp16 above all, may swap across the cut or within it).
        want = common.align_topk(ref, got["topk_queries"]) if topk else ref
        if topk:
            gap = common.topk_rank_gap(ref["pred_logits"], got["topk_queries"])
            tol = tolerance(precision, want["topk_logits"])
            ok &= gap <= tol
            print(f"  {'topk set':16s} kept vs PyTorch's top {topk}: {gap:.3e} below its k-th best (tol {tol:.1e}) "
                  f"{'ok' if gap <= tol else 'FAIL'}")

        case_dir = parity_out / f"case_{i}"
        case_dir.mkdir(parents=True, exist_ok=True)
        print(f"case_{i}: {image_path.name} {image.size[0]}x{image.size[1]} concepts={case['concepts']} "
              f"tokens={lengths}")
        for name in common.decoder_output_names(topk):
            delta, tol = common.output_delta(want[name], got[name])
            # fp16: the logit tolerance, in codes where the graph returns uint8 (σ · 255 rises at most 255/4 per unit)
            tol = max(tol, tolerance(precision, want[name]) * (255 / 4 if got[name].dtype == np.uint8 else 1))
            flag = "ok" if delta <= tol else "FAIL"
            ok &= delta <= tol
            print(f"  {name:16s} shape={list(want[name].shape)} max|ref|={np.abs(want[name]).max():9.4f} "
                  f"max|Δ|={delta:.3e} tol={tol:.1e} {flag}")

        threshold = float(case.get("score_threshold", 0.5))
        rel_image = os.path.relpath(image_path, case_dir.resolve())
        common.write_json(case_dir / "case.json", {
            "image": rel_image, "concepts": case["concepts"], "score_threshold": threshold,
            "oriented_width": image.size[0], "oriented_height": image.size[1]})
        for name, arr in (("pixel_values", pixel_values), ("input_ids", input_ids),
                          ("attention_mask", attention_mask), *ref.items()):
            np.save(case_dir / f"{name}.npy", np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))))
        expected = common.expected_instances(ref, case["concepts"], threshold, image.size[0], image.size[1])
        common.write_json(case_dir / "expected.json", expected)
        kept = [len(c["instances"]) for c in expected["concepts"]]
        scores = common.sigmoid(ref["pred_logits"]) * common.sigmoid(ref["presence_logits"])
        margin = float(np.abs(scores - threshold).min())
        print(f"  presence={[round(c['presence_score'], 3) for c in expected['concepts']]} kept={kept} "
              f"(threshold {threshold}, of {ref['pred_logits'].shape[1]} queries each; "
              f"closest score is {margin:.3f} from the threshold)")
        if margin < 1e-3:
            print("  WARNING: a score sits within 1e-3 of the threshold; pick another so the kept set is stable")
        checker = check_onnx.Checker()
        worst = check_onnx.check_batching(sessions, pixel_values, input_ids, attention_mask, checker)
        print(f"  ORT batched vs single runs: max |Δ| {worst:.2e}")
        ok &= not checker.failures
    return ok


# ---------------------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF repo id (e.g. facebook/sam3; token from HF_TOKEN) or a local snapshot dir")
    src.add_argument("--random-init", choices=["tiny", "mid", "full"], help="random weights, no download")
    ap.add_argument("--revision", default=None, help="HF revision (branch, tag or commit) for --model")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    ap.add_argument("--out", type=Path, required=True, help="output directory for the 5 model files")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="same as --precision fp16")
    ap.add_argument("--opset", type=int, default=common.OPSET, help=argparse.SUPPRESS)
    ap.add_argument("--topk", type=int, default=common.DEFAULT_TOPK,
                    help="queries the decoder returns per phrase, best first (capped at the model's; 0: all, dense "
                         f"outputs). Bounds MAX_INSTANCES_PER_CONCEPT. Default {common.DEFAULT_TOPK}")
    ap.add_argument("--image-input", choices=["u8", "f32"], default="u8",
                    help="the vision graph's image input: u8 = the resized photo as uint8 HWC, normalised in the "
                         "graph (default); f32 = normalised float32 CHW, as exports before 2026-11-30")
    ap.add_argument("--mask-output", choices=["u8", "f32"], default="u8",
                    help="u8 (default): the decoder returns its mask planes as uint8 probabilities round(σ·255) "
                         "(mask_output.py, a quarter of the bytes); f32: the logits, as earlier exports")
    ap.add_argument("--attention", choices=["fused", "eager"], default="fused",
                    help="fused (default): each attention block of the vision and decoder graphs is one "
                         "com.microsoft MultiHeadAttention node (fused_attention.py); eager: the traced "
                         "MatMul/Softmax form, as exports before 2026-11-30")
    ap.add_argument("--rope", choices=["fused", "traced"], default="fused",
                    help="fused (default, with --attention fused): the vision graph's RoPE applications are "
                         "com.microsoft RotaryEmbedding nodes (fused_rope.py; on an H200 vision 27.0 -> 23.5 ms); "
                         "traced: the traced Mul/Split/Neg/Concat form, as exports before 2026-12-04")
    ap.add_argument("--layers", choices=["plain", "fused"], default="plain",
                    help="fused (with --attention fused): residual Add + LayerNorm as com.microsoft "
                         "SkipLayerNormalization and each attention block's projections packed (fused_layers.py; "
                         "not measured on a GPU yet); plain (default): as traced")
    ap.add_argument("--clip-bpe", default=None, help=f"path to {BPE_NAME} (default: found automatically, see above)")
    ap.add_argument("--parity-out", type=Path, default=None, help="run PyTorch vs ORT and write reference outputs here")
    ap.add_argument("--images", nargs="+", default=[], help="parity images (all get the same --concepts)")
    ap.add_argument("--concepts", nargs="+", default=[], help="parity concepts")
    ap.add_argument("--score-threshold", type=float, default=0.5)
    ap.add_argument("--cases", type=Path, default=None,
                    help='JSON list of {"image", "concepts", "score_threshold"}; image paths relative to the file')
    args = ap.parse_args(argv)
    if args.model is None and args.revision:
        ap.error("--revision needs --model")
    if args.layers == "fused" and args.attention != "fused":
        ap.error("--layers fused needs --attention fused (the projections are packed per MultiHeadAttention)")
    if args.parity_out and not (args.cases or (args.images and args.concepts)):
        ap.error("--parity-out needs --cases FILE or --images ... --concepts ...")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_clip_tokenizer(find_clip_bpe(args.clip_bpe))
    checks = common.check_tokenizer(tokenizer)
    tokenizer.save(str(args.out / "tokenizer.json"), pretty=False)
    print(f"tokenizer.json written; checks {checks}")

    t0 = time.time()
    model, info = load_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model ready: {n_params:,} parameters ({time.time() - t0:.1f} s) {info}", flush=True)

    topk = min(max(args.topk, 0), model_dims(model)["num_queries"])
    graphs = export_graphs(model, args.out, args.precision, args.opset, topk, args.image_input, args.attention,
                           args.mask_output, args.rope, args.layers)
    manifest = write_manifest(args.out, info, model_dims(model), args.precision, args.opset, graphs, topk,
                              args.attention, args.rope, args.layers)
    print(f"manifest.json written: image_size={manifest['image_size']} mask_size={manifest['mask_size']} "
          f"queries={manifest['num_queries']} D={manifest['text_feature_dim']} C={manifest['fpn_channels']}")

    if args.parity_out:
        if args.cases:
            base = args.cases.resolve().parent
            cases = json.loads(args.cases.read_text())
            for c in cases:
                c["image"] = str(base / c["image"])
        else:
            cases = [{"image": img, "concepts": args.concepts, "score_threshold": args.score_threshold}
                     for img in args.images]
        if not run_parity(model, args.out, cases, args.parity_out, args.precision, topk):
            print("PARITY FAILED: ONNX Runtime and PyTorch disagree beyond tolerance", file=sys.stderr)
            return 1
        print("parity ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
