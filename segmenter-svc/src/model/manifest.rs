//! manifest.json, written by `export/export_sam3.py`: what the graphs are, how to feed them, and their checksums.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ModelError;
use crate::mask_plane::MaskOutput;

pub const FORMAT: &str = "palette-sam3-onnx";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub source_model: String,
    pub source_revision: String,
    pub random_init: Option<String>,
    pub precision: String,
    /// "fused" (attention blocks are com.microsoft MultiHeadAttention nodes, export/fused_attention.py) or "eager"
    /// (the traced MatMul/Softmax form; exports without the field). Only logged: ONNX Runtime runs both.
    #[serde(default)]
    pub attention: Option<String>,
    pub image_size: u32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub mask_size: u32,
    pub num_queries: u32,
    /// Queries the decoder returns per phrase, best first (0: all of them, the dense outputs of older exports).
    #[serde(default)]
    pub decoder_topk: u32,
    pub text_context_length: u32,
    pub text_feature_dim: u32,
    #[serde(default)]
    pub session_hints: SessionHints,
    pub tokenizer: TokenizerSpec,
    pub graphs: Graphs,
}

/// Switches the exporter found necessary for a graph set (fp16 exports made before export/fp16.py dropped stale
/// value_info shapes need the memory pattern off on the CUDA EP); the server applies them to every session.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SessionHints {
    #[serde(default)]
    pub disable_memory_pattern: bool,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TokenizerSpec {
    pub file: String,
    pub sha256: String,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Graphs {
    pub vision: GraphSpec,
    pub text: GraphSpec,
    pub decoder: GraphSpec,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GraphSpec {
    pub file: String,
    pub sha256: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    #[serde(default)]
    pub external_data: Vec<FileSpec>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct FileSpec {
    pub file: String,
    pub sha256: String,
}

/// The two image inputs a vision graph may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageInput {
    /// `image_u8` uint8 [B, S, S, 3]: the resized RGB bytes; the graph normalises them (export/image_input.py), so
    /// the host sends a quarter of the bytes and does no float pass.
    U8Hwc,
    /// `pixel_values` float32 [B, 3, S, S], normalised on the host: exports from before 2026-11-30.
    F32Chw,
}

impl ImageInput {
    pub fn names(self) -> &'static [&'static str] {
        match self {
            ImageInput::U8Hwc => VISION_INPUTS_U8,
            ImageInput::F32Chw => VISION_INPUTS_F32,
        }
    }

    /// The graph input's name.
    pub fn tensor_name(self) -> &'static str {
        self.names()[0]
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
}

/// The names the server feeds and reads. The exporter writes exactly these; a manifest that differs is refused at
/// startup rather than failing on the first request.
/// The vision graph's image input, one of two (`ImageInput`): exports since 2026-11-30 take the resized photo's bytes.
pub const VISION_INPUTS_U8: &[&str] = &["image_u8"];
pub const VISION_INPUTS_F32: &[&str] = &["pixel_values"];
pub const VISION_OUTPUTS: &[&str] = &["fpn_0", "fpn_1", "fpn_2"];
pub const TEXT_INPUTS: &[&str] = &["input_ids", "attention_mask"];
pub const TEXT_OUTPUTS: &[&str] = &["text_features"];
pub const DECODER_INPUTS: &[&str] = &["fpn_0", "fpn_1", "fpn_2", "text_features", "text_mask"];
/// Dense decoder outputs (`--topk 0`, and exports from before top-k): every query's mask leaves the graph.
pub const DECODER_OUTPUTS_DENSE: &[&str] = &[
    "pred_masks",
    "pred_boxes",
    "pred_logits",
    "presence_logits",
    "semantic_seg",
];
/// The decoder outputs that are [M, M] mask planes: float32 logits or uint8 probabilities (`MaskOutput`).
pub const MASK_PLANES: &[&str] = &["pred_masks", "topk_masks", "semantic_seg"];
/// Top-k decoder outputs (the exporter's default): the graph keeps its best K queries per phrase, so the dense
/// [N, Q, M, M] mask tensor stays inside ONNX Runtime (on the device, with CUDA).
pub const DECODER_OUTPUTS_TOPK: &[&str] = &[
    "topk_masks",
    "topk_boxes",
    "topk_logits",
    "topk_queries",
    "presence_logits",
    "semantic_seg",
];

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Missing {
            dir: dir.to_path_buf(),
            detail: format!("{}: {source}", path.display()),
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(m));
        if self.format != FORMAT || self.format_version != FORMAT_VERSION {
            return bad(format!(
                "manifest format {} v{} is not {FORMAT} v{FORMAT_VERSION}; re-export with this version's export_sam3.py",
                self.format, self.format_version
            ));
        }
        if self.image_size == 0 || self.mask_size == 0 || self.num_queries == 0 {
            return bad("image_size, mask_size and num_queries must be positive".into());
        }
        // Exports made before e7d2e8b wrote the hints per graph (`{"vision": {"disable_memory_pattern": true}}`):
        // read as unknown keys, their switch was off, and the fp16 vision graph failed its warm-up on the CUDA EP
        // with an ONNX Runtime error that never named the manifest.
        if let Some((graph, _)) = self.session_hints.other.iter().find(|(_, v)| v.is_object()) {
            return bad(format!(
                "session_hints.{graph} is the older exporter's per-graph form, which this version does not read; \
                 re-export with this version's export_sam3.py"
            ));
        }
        if !self.session_hints.other.is_empty() {
            let keys: Vec<&String> = self.session_hints.other.keys().collect();
            tracing::warn!(
                ?keys,
                "session hints this version does not know are ignored"
            );
        }
        if self.text_context_length < 3 {
            return bad("text_context_length must leave room for BOS, one token and EOS".into());
        }
        if self.image_std.iter().any(|s| *s <= 0.0) {
            return bad("image_std must be positive".into());
        }
        check_names(
            "vision",
            "input",
            &self.graphs.vision.inputs,
            self.image_input().names(),
        )?;
        check_names(
            "vision",
            "output",
            &self.graphs.vision.outputs,
            VISION_OUTPUTS,
        )?;
        check_names("text", "input", &self.graphs.text.inputs, TEXT_INPUTS)?;
        check_names("text", "output", &self.graphs.text.outputs, TEXT_OUTPUTS)?;
        check_names(
            "decoder",
            "input",
            &self.graphs.decoder.inputs,
            DECODER_INPUTS,
        )?;
        check_names(
            "decoder",
            "output",
            &self.graphs.decoder.outputs,
            self.decoder_outputs(),
        )?;
        self.check_mask_output()?;
        if self.decoder_topk > self.num_queries {
            return bad(format!(
                "decoder_topk {} exceeds num_queries {}",
                self.decoder_topk, self.num_queries
            ));
        }
        Ok(())
    }

    /// How the vision graph takes an image: told by its input's name (older exports: normalised f32).
    pub fn image_input(&self) -> ImageInput {
        match self.graphs.vision.inputs.first() {
            Some(input) if input.name == VISION_INPUTS_U8[0] => ImageInput::U8Hwc,
            _ => ImageInput::F32Chw,
        }
    }

    /// How the decoder returns its mask planes: uint8 probabilities (exports since 2026-11-30,
    /// export/mask_output.py) or float32 logits, told by the manifest's dtype of its mask outputs.
    pub fn mask_output(&self) -> MaskOutput {
        match self.mask_dtypes().next() {
            Some("uint8") => MaskOutput::ProbabilityU8,
            _ => MaskOutput::Logits,
        }
    }

    fn mask_dtypes(&self) -> impl Iterator<Item = &str> {
        self.graphs
            .decoder
            .outputs
            .iter()
            .filter(|t| MASK_PLANES.contains(&t.name.as_str()))
            .map(|t| t.dtype.as_str())
    }

    /// The mask planes share one dtype, and one the server reads.
    fn check_mask_output(&self) -> Result<(), ModelError> {
        let dtypes: Vec<&str> = self.mask_dtypes().collect();
        let known = dtypes.iter().all(|d| matches!(*d, "float32" | "uint8"));
        if !known || dtypes.windows(2).any(|w| w[0] != w[1]) {
            return Err(ModelError::Invalid(format!(
                "decoder mask outputs {MASK_PLANES:?} must all be float32 (logits) or all uint8 (probabilities), \
                 the manifest has {dtypes:?}"
            )));
        }
        Ok(())
    }

    /// The decoder outputs this export has (dense or top-k).
    pub fn decoder_outputs(&self) -> &'static [&'static str] {
        if self.decoder_topk > 0 {
            DECODER_OUTPUTS_TOPK
        } else {
            DECODER_OUTPUTS_DENSE
        }
    }

    /// Every file the model folder must hold, with its expected checksum.
    pub fn files(&self) -> Vec<(&str, &str)> {
        let mut files = vec![(self.tokenizer.file.as_str(), self.tokenizer.sha256.as_str())];
        for g in [&self.graphs.vision, &self.graphs.text, &self.graphs.decoder] {
            files.push((g.file.as_str(), g.sha256.as_str()));
            files.extend(
                g.external_data
                    .iter()
                    .map(|f| (f.file.as_str(), f.sha256.as_str())),
            );
        }
        files
    }

    /// Checks that every file exists and, when asked, that its SHA-256 matches.
    pub fn verify_files(&self, dir: &Path, checksums: bool) -> Result<(), ModelError> {
        for (file, expected) in self.files() {
            let path = safe_join(dir, file)?;
            if !path.is_file() {
                return Err(ModelError::Missing {
                    dir: dir.to_path_buf(),
                    detail: format!("{file} is missing"),
                });
            }
            if checksums {
                let actual = sha256_file(&path)?;
                if !actual.eq_ignore_ascii_case(expected) {
                    return Err(ModelError::Invalid(format!(
                        "{file}: SHA-256 {actual} does not match the manifest's {expected} (corrupt or partial copy?)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// A short stable id: clients key caches by it (masks from one export are not reusable with another). The
    /// digest covers all three graphs: a rewrite of one of them alone (export/fused_rope.py converts only the vision
    /// graph) computes in other kernels, and its masks may differ in rounding.
    pub fn model_id(&self) -> String {
        let source = self.source_model.rsplit('/').next().unwrap_or("sam3");
        let kind = self
            .random_init
            .as_deref()
            .map(|r| format!("random-{r}"))
            .unwrap_or_else(|| source.to_string());
        let graphs = &self.graphs;
        let mut hasher = Sha256::new();
        for (name, spec) in [
            ("vision", &graphs.vision),
            ("text", &graphs.text),
            ("decoder", &graphs.decoder),
        ] {
            hasher.update(format!("{name}:{}\n", spec.sha256.to_ascii_lowercase()));
        }
        let digest = hex::encode(hasher.finalize());
        format!("{kind}-{}-{}", self.precision, &digest[..12])
    }
}

fn check_names(
    graph: &str,
    kind: &str,
    actual: &[TensorSpec],
    expected: &[&str],
) -> Result<(), ModelError> {
    let names: Vec<&str> = actual.iter().map(|t| t.name.as_str()).collect();
    if names != expected {
        return Err(ModelError::Invalid(format!(
            "{graph} graph {kind}s are {names:?}, expected {expected:?}"
        )));
    }
    Ok(())
}

/// Joins a manifest-relative file name, refusing anything that would leave the model folder.
pub fn safe_join(dir: &Path, file: &str) -> Result<PathBuf, ModelError> {
    let rel = Path::new(file);
    let plain = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(ModelError::Invalid(format!(
            "manifest file name {file:?} must be a plain relative path"
        )));
    }
    Ok(dir.join(rel))
}

fn sha256_file(path: &Path) -> Result<String, ModelError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled() -> Manifest {
        serde_json::from_str(include_str!("../../models/sam3-tiny/manifest.json")).unwrap()
    }

    #[test]
    fn the_model_id_changes_with_any_graph() {
        let base = bundled().model_id();
        assert!(base.starts_with("random-tiny-fp32-"), "{base}");
        assert_eq!(base, bundled().model_id(), "stable");
        for graph in 0..3 {
            let mut m = bundled();
            let spec = match graph {
                0 => &mut m.graphs.vision,
                1 => &mut m.graphs.text,
                _ => &mut m.graphs.decoder,
            };
            spec.sha256 = "0".repeat(64);
            assert_ne!(m.model_id(), base, "graph {graph}");
        }
    }
}
