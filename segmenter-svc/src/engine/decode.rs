//! One decoder run: a chunk of one image's phrases through the decoder, then the filter on its outputs.
//!
//! A chunk runs on the smallest static-shape session that holds it (DECODER_STATIC_BATCHES), else on the dynamic
//! graph. A static session with fixed I/O (SEGMENTER_CUDA_GRAPHS, model/fixed_io.rs) reads the image from the fixed
//! FPN tensors and leaves its outputs in host tensors; the others take views of the vision run's outputs and return
//! theirs, in buffers of their own with SEGMENTER_PINNED_OUTPUTS (model/host_outputs.rs). The filter reads either
//! through `OutputRef`.
//!
//! A child module of `worker`, kept in its own file.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ort::session::{Session, SessionOutputs};
use ort::value::{PrimitiveTensorElementType, TensorRef};

use super::{EngineSettings, FpnLevel, decoder_choice};
use crate::mask_plane::{MaskOutput, MaskRows};
use crate::model::fixed_io::{FixedDecoder, StaticDecoder};
use crate::model::host_outputs::HostOutputs;
use crate::model::tokenizer::Tokens;
use crate::postprocess::{ConceptOutputs, FilterParams, KeptConcept, filter_concept};

/// The decoder sessions a chunk may run on, borrowed from `Sessions` (whose vision outputs the chunk reads).
pub(super) struct Decoders<'s> {
    pub dynamic: &'s mut Session,
    /// The dynamic session's preallocated outputs (SEGMENTER_PINNED_OUTPUTS).
    pub dynamic_outputs: Option<&'s mut HostOutputs>,
    pub statics: &'s mut [(usize, StaticDecoder)],
}

/// Runs the decoder on one image's FPN levels for a chunk of phrases and keeps the instances that pass the filter;
/// returns them with the time the filter took.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_chunk(
    decoders: Decoders<'_>,
    settings: &EngineSettings,
    fpn: &[FpnLevel<'_>],
    image: usize,
    features: &[Arc<[f32]>],
    tokens: &[Tokens],
    image_size: (u32, u32),
    params: FilterParams,
) -> ort::Result<(Vec<KeptConcept>, Duration)> {
    let Decoders {
        dynamic,
        dynamic_outputs,
        statics,
    } = decoders;
    let n = features.len();
    let chosen = decoder_choice::smallest_holding(statics, n);
    // `rows` >= n: a static-shape session runs its fixed count, the rows past n repeat the last phrase.
    let rows = chosen.as_ref().map_or(n, |(count, _)| *count);
    let l = settings.context;
    let text: Vec<f32> = decoder_choice::pad_rows(features, rows)
        .iter()
        .flat_map(|f| f.iter().copied())
        .collect();
    let mask: Vec<i64> = decoder_choice::pad_rows(tokens, rows)
        .iter()
        .flat_map(|t| t.mask.iter().copied())
        .collect();
    let d = text.len() / (rows * l);
    let chunk = Chunk {
        settings,
        n,
        rows,
        image_size,
        params,
    };
    match chosen {
        Some((
            _,
            StaticDecoder {
                session,
                fixed: Some(io),
                ..
            },
        )) => {
            // The fixed FPN tensors hold the image of the last one-image vision run (fixed I/O needs
            // MAX_BATCH_IMAGES=1, checked at startup).
            if image != 0 || fpn.first().is_some_and(|level| level.batch != 1) {
                return Err(ort::Error::new(
                    "fixed decoder I/O needs one image per vision run",
                ));
            }
            io.run(session, text, mask)?;
            let io: &FixedDecoder = io;
            chunk.keep(&|name| OutputRef::Fixed(io, name))
        }
        other => {
            let (decoder, preallocated) = match other {
                Some((_, fixed_count)) => (&mut fixed_count.session, fixed_count.outputs.as_mut()),
                None => (dynamic, dynamic_outputs),
            };
            let inputs = ort::inputs![
                "fpn_0" => fpn[0].image(image)?,
                "fpn_1" => fpn[1].image(image)?,
                "fpn_2" => fpn[2].image(image)?,
                "text_features" => TensorRef::from_array_view(([rows, l, d], &text[..]))?,
                "text_mask" => TensorRef::from_array_view(([rows, l], &mask[..]))?,
            ];
            let outputs = match preallocated {
                Some(host) => {
                    let options = host.options(decoder, rows)?;
                    decoder.run_with_options(inputs, options)?
                }
                None => decoder.run(inputs)?,
            };
            chunk.keep(&|name| OutputRef::Run(&outputs, name))
        }
    }
}

/// One decoder output by name, in a run's outputs or in a fixed decoder's host tensors.
enum OutputRef<'o, 'r> {
    Run(&'o SessionOutputs<'r>, &'static str),
    Fixed(&'o FixedDecoder, &'static str),
}

impl<'o> OutputRef<'o, '_> {
    fn values<T: PrimitiveTensorElementType + std::fmt::Debug>(self) -> ort::Result<&'o [T]> {
        match self {
            OutputRef::Run(outputs, name) => Ok(outputs[name].try_extract_tensor::<T>()?.1),
            OutputRef::Fixed(io, name) => io.host(name),
        }
    }

    /// A mask output in the form the export returns it.
    fn planes(self, form: MaskOutput) -> ort::Result<MaskRows<'o>> {
        Ok(match form {
            MaskOutput::Logits => MaskRows::Logits(self.values()?),
            MaskOutput::ProbabilityU8 => MaskRows::ProbabilityU8(self.values()?),
        })
    }
}

/// What the filter needs to know about a decoder run besides its outputs.
struct Chunk<'s> {
    settings: &'s EngineSettings,
    /// Phrases of the chunk, and rows the decoder ran (n, or the static session's count).
    n: usize,
    rows: usize,
    image_size: (u32, u32),
    params: FilterParams,
}

impl Chunk<'_> {
    /// `keep_concepts` and the time it took.
    fn keep<'o, 'r>(
        &self,
        output: &dyn Fn(&'static str) -> OutputRef<'o, 'r>,
    ) -> ort::Result<(Vec<KeptConcept>, Duration)> {
        let t = Instant::now();
        let kept = keep_concepts(self, output)?;
        Ok((kept, t.elapsed()))
    }
}

/// The first `n` of a decoder run's `rows` phrases through the filter, reading the outputs by name.
fn keep_concepts<'o, 'r>(
    chunk: &Chunk<'_>,
    output: &dyn Fn(&'static str) -> OutputRef<'o, 'r>,
) -> ort::Result<Vec<KeptConcept>> {
    let Chunk {
        settings,
        n,
        rows,
        image_size,
        params,
    } = *chunk;
    // Top-k exports return R = K rows per phrase with their query indices; dense ones return every query.
    let topk = settings.decoder_topk > 0;
    let name = |dense: &'static str, top: &'static str| if topk { top } else { dense };
    let form = settings.mask_output;
    let masks = output(name("pred_masks", "topk_masks")).planes(form)?;
    let boxes = output(name("pred_boxes", "topk_boxes")).values::<f32>()?;
    let logits = output(name("pred_logits", "topk_logits")).values::<f32>()?;
    let queries = if topk {
        Some(output("topk_queries").values::<i64>()?)
    } else {
        None
    };
    let presence = output("presence_logits").values::<f32>()?;
    let semantic = output("semantic_seg").planes(form)?;
    let m = settings.mask_size;
    let q = logits.len() / rows;
    Ok((0..n)
        .map(|i| {
            let view = ConceptOutputs {
                masks: masks.planes(i * q, (i + 1) * q, m * m),
                boxes: &boxes[i * q * 4..(i + 1) * q * 4],
                logits: &logits[i * q..(i + 1) * q],
                queries: queries.map(|all| &all[i * q..(i + 1) * q]),
                presence_logit: presence[i],
                semantic: semantic.planes(i, i + 1, m * m),
            };
            filter_concept(&view, m, image_size, params)
        })
        .collect())
}
