//! Warm-up before SERVING: every shape a request will run, once. ONNX Runtime's first run at a new shape is slow
//! (2x on the CPU; on CUDA it also picks kernels and grows the arena), and without this the first requests with 3 or
//! 8 concepts, or the first full vision batch, would pay for it.
//!
//! A child module of `worker` (it uses the worker's private run helpers), kept in its own file.

use std::time::Instant;

use super::{Decoders, TEXT_RUN_MAX, Worker, bind_vision, decode_chunk, fpn_views, zero_images};
use crate::model::runtime::Provider;
use crate::postprocess::FilterParams;

/// The text-encoder batch sizes above the decoder's counts to warm up: on a GPU every size a batch of new phrases can
/// run at (up to TEXT_RUN_MAX, and no more than a full vision batch's MAX_CONCEPTS each can bring), so the first
/// request with more new phrases than the decoder chunk does not pay the first run at its size after SERVING. The
/// text encoder is small (~13 ms a run at full size on an H200): a few hundred ms more startup at most. On the CPU
/// none (its first run at a shape is ~2x, not a kernel search).
pub(super) fn text_counts(
    decoder_counts_up_to: usize,
    max_batch_images: usize,
    max_concepts: usize,
    gpu: bool,
) -> std::ops::RangeInclusive<usize> {
    let most = TEXT_RUN_MAX.min(max_batch_images.max(1).saturating_mul(max_concepts.max(1)));
    // On the CPU an empty range: from past the last to the last.
    let first = if gpu {
        decoder_counts_up_to + 1
    } else {
        most + 1
    };
    first..=most
}

/// The vision batch sizes and decoder phrase counts to warm up. On a GPU every shape a request can run: each vision
/// batch size up to MAX_BATCH_IMAGES and each phrase count up to the decoder chunk (a request never runs more
/// phrases at once). A shape's first run is slow there (kernel choice, arena growth; with
/// CUDNN_CONV_SEARCH=exhaustive cuDNN times every convolution algorithm): ~0.4 s per count at full size on an H200,
/// ~2 s more startup for the counts between 1, 3 and 8, which the first requests with 2 or 4-7 concepts (or the first
/// batch of 2-3 images) paid after SERVING before. On the CPU 1 image and 1, 3, 8 phrases and the chunk: a full
/// batch would add ~2 minutes to every start at full size (vision ≈ 28 s per image on 2 cores) to save one slower
/// first batch.
pub(super) fn shapes(
    max_batch_images: usize,
    decoder_chunk: usize,
    gpu: bool,
) -> (Vec<usize>, Vec<usize>) {
    let chunk = decoder_chunk.max(1);
    if gpu {
        return (
            (1..=max_batch_images.max(1)).collect(),
            (1..=chunk).collect(),
        );
    }
    let vision = vec![1];
    let mut decoder: Vec<usize> = [1, 3, 8, chunk].into_iter().map(|n| n.min(chunk)).collect();
    decoder.sort_unstable();
    decoder.dedup();
    (vision, decoder)
}

impl Worker {
    /// The text encoder alone at each of `counts` phrases (the decoder warm-up runs it at the smaller counts).
    fn warm_up_text(&mut self, counts: std::ops::RangeInclusive<usize>) -> ort::Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let first = *counts.start();
        let mut last = first;
        for n in counts {
            if self.stopping() {
                return Ok(());
            }
            self.run_text(&vec![self.settings.probe_tokens.clone(); n])?;
            last = n;
        }
        tracing::info!(
            text_phrases = format!("{first}-{last}"),
            ms = started.elapsed().as_millis() as u64,
            "warm-up"
        );
        Ok(())
    }

    /// Shutdown asked: warm-up stops between shapes (the caller then does not serve).
    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The probe (one image, one phrase, all three graphs), then the other shapes of `shapes`. Any failure fails the
    /// warm-up: the engine reports Failed and never serves.
    pub(super) fn warm_up(&mut self) -> ort::Result<()> {
        self.probe()?;
        let gpu = matches!(self.sessions.provider, Provider::Cuda(_));
        // One image never runs more phrases than MAX_CONCEPTS at once.
        let decoder_counts_up_to = self.settings.decoder_chunk.min(self.settings.max_concepts);
        let (vision_batches, phrase_counts) =
            shapes(self.settings.max_batch_images, decoder_counts_up_to, gpu);
        self.warm_up_text(text_counts(
            decoder_counts_up_to.max(1),
            self.settings.max_batch_images,
            self.settings.max_concepts,
            gpu,
        ))?;
        let s = self.settings.image_size;
        for &batch in vision_batches.iter().filter(|&&b| b > 1) {
            if self.stopping() {
                return Ok(());
            }
            let started = Instant::now();
            let binding = bind_vision(
                &self.sessions.vision,
                zero_images(self.settings.image_input, batch, s),
                batch,
                s,
                &self.sessions.provider,
                None,
            )?;
            let outputs = self.sessions.vision.run_binding(&binding)?;
            binding.synchronize_outputs()?;
            drop(outputs);
            tracing::info!(
                vision_batch = batch,
                ms = started.elapsed().as_millis() as u64,
                "warm-up"
            );
        }
        // A captured vision session runs twice more here (the probe ran it once, the decoder warm-up below runs it
        // again): ONNX Runtime captures a session's graph on its third run on this thread and replays it right away,
        // so a capture failure fails the warm-up, not a request.
        if let Some(fixed) = self
            .sessions
            .fixed_vision
            .as_mut()
            .filter(|f| f.has_fixed_input())
        {
            for run in 2..=3 {
                if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(());
                }
                let started = Instant::now();
                let binding = bind_vision(
                    &self.sessions.vision,
                    zero_images(self.settings.image_input, 1, s),
                    1,
                    s,
                    &self.sessions.provider,
                    Some(&mut *fixed),
                )?;
                let outputs = self.sessions.vision.run_binding(&binding)?;
                binding.synchronize_outputs()?;
                drop(outputs);
                tracing::info!(
                    vision_batch = 1,
                    run,
                    ms = started.elapsed().as_millis() as u64,
                    "warm-up"
                );
            }
        }
        // Each static-shape decoder session within the chunk runs once too (3 phrases run on a 4-phrase session).
        // With fixed I/O (CUDA graphs) each runs three times: ONNX Runtime captures a session's graph on its third
        // run and replays it right away, so a capture or replay failure fails the warm-up, not a request.
        let captured_decoders = self
            .sessions
            .decoder_static
            .iter()
            .any(|(_, d)| d.fixed.is_some());
        let repeats = if captured_decoders { 3 } else { 1 };
        let chunk = self.settings.decoder_chunk.max(1);
        let mut counts: Vec<usize> = phrase_counts
            .into_iter()
            .chain(self.sessions.decoder_static.iter().map(|(n, _)| *n))
            .filter(|&n| (n > 1 || repeats > 1) && n <= chunk)
            .collect();
        counts.sort_unstable();
        counts.dedup();
        // This runs the vision graph once more (a minute at full size on the CPU): not after a shutdown was asked.
        if counts.is_empty() || self.stopping() {
            return Ok(());
        }
        let tokens = self.settings.probe_tokens.clone();
        let binding = bind_vision(
            &self.sessions.vision,
            zero_images(self.settings.image_input, 1, s),
            1,
            s,
            &self.sessions.provider,
            self.sessions.fixed_vision.as_mut(),
        )?;
        let vision_out = self.sessions.vision.run_binding(&binding)?;
        binding.synchronize_outputs()?;
        let fpn = fpn_views(&vision_out)?;
        let params = FilterParams {
            threshold: 1.0,
            max_instances: 0,
            keep_semantic: false,
        };
        let stop = self.stop.clone();
        for n in counts {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            let started = Instant::now();
            let phrases = vec![tokens.clone(); n];
            // The text encoder at this count too: a batch of new phrases runs it at the same N.
            let ids: Vec<i64> = phrases.iter().flat_map(|t| t.ids.iter().copied()).collect();
            let mask: Vec<i64> = phrases
                .iter()
                .flat_map(|t| t.mask.iter().copied())
                .collect();
            let l = self.settings.context;
            let text_out = self.sessions.text.run(ort::inputs![
                "input_ids" => ort::value::TensorRef::from_array_view(([n, l], &ids[..]))?,
                "attention_mask" => ort::value::TensorRef::from_array_view(([n, l], &mask[..]))?,
            ])?;
            let (_, data) = text_out["text_features"].try_extract_tensor::<f32>()?;
            let per = data.len() / n;
            let features: Vec<std::sync::Arc<[f32]>> =
                data.chunks_exact(per).map(std::sync::Arc::from).collect();
            drop(text_out);
            for _ in 0..repeats {
                decode_chunk(
                    Decoders {
                        dynamic: &mut self.sessions.decoder,
                        dynamic_outputs: self.sessions.decoder_outputs.as_mut(),
                        statics: &mut self.sessions.decoder_static,
                    },
                    &self.settings,
                    &fpn,
                    0,
                    &features,
                    &phrases,
                    (1, 1),
                    params,
                )?;
            }
            tracing::info!(
                phrases = n,
                runs = repeats,
                ms = started.elapsed().as_millis() as u64,
                "warm-up"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{TEXT_RUN_MAX, shapes, text_counts};

    #[test]
    fn warm_up_shapes_cover_common_counts_and_the_configured_sizes() {
        // CUDA: every shape a request can run (defaults: one image per vision run, decoder chunk 8).
        assert_eq!(shapes(1, 8, true), (vec![1], (1..=8).collect::<Vec<_>>()));
        assert_eq!(shapes(3, 2, true), (vec![1, 2, 3], vec![1, 2]));
        assert_eq!(shapes(0, 0, true), (vec![1], vec![1]));
        // CPU: one image, the common counts and the chunk (defaults: batches of 4, chunk 2).
        assert_eq!(shapes(4, 2, false), (vec![1], vec![1, 2]));
        assert_eq!(shapes(4, 16, false), (vec![1], vec![1, 3, 8, 16]));
    }

    #[test]
    fn text_warm_up_covers_every_new_phrase_count_above_the_decoder_chunk_on_a_gpu() {
        // CUDA defaults: chunk 8, one image of up to 32 concepts: 9..=32.
        assert_eq!(text_counts(8, 1, 32, true), 9..=32);
        // Never more than a run takes, nor than a batch can bring.
        assert_eq!(text_counts(8, 4, 32, true), 9..=TEXT_RUN_MAX);
        assert_eq!(text_counts(8, 1, 12, true), 9..=12);
        assert!(text_counts(8, 1, 8, true).is_empty());
        // CPU: none.
        assert!(text_counts(2, 4, 32, false).is_empty());
    }
}
