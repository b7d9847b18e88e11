//! Rust outputs against the PyTorch reference outputs committed with the tiny model (export_sam3.py --parity-out).
//!
//! Three layers, so a failure says where it comes from: the tokenizer (exact ids), pre-processing (pixels within
//! one 8-bit step of PIL's antialiased bilinear resize), and the model through the engine fed the reference's own
//! pixels and tokens (same kept instances; scores, boxes and mask logits within tolerance).

use palette_testing::segmenter as common;

use std::path::Path;
use std::time::{Duration, Instant};

use ndarray::{Array2, Array4, ArrayD, Ix2};
use ndarray_npy::read_npy;
use segmenter_svc::engine::{Health, Job};
use segmenter_svc::mask_plane::MaskPlane;
use segmenter_svc::model::tokenizer::Tokens;
use segmenter_svc::postprocess::FilterParams;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    image: String,
    concepts: Vec<String>,
    score_threshold: f32,
    oriented_width: u32,
    oriented_height: u32,
}

#[derive(Deserialize)]
struct Expected {
    concepts: Vec<ExpectedConcept>,
}

#[derive(Deserialize)]
struct ExpectedConcept {
    presence_score: f32,
    instances: Vec<ExpectedInstance>,
}

#[derive(Deserialize)]
struct ExpectedInstance {
    query: u32,
    score: f32,
    #[serde(rename = "box")]
    bbox: [f32; 4],
}

fn cases() -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(common::fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 3, "reference cases missing");
    dirs
}

fn load_case(dir: &Path) -> (Case, Expected) {
    let case: Case =
        serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
    let expected: Expected =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    (case, expected)
}

#[tokio::test]
async fn tokenizer_matches_the_reference_ids() {
    let shared = segmenter_svc::server::load(&common::test_config())
        .await
        .unwrap();
    for dir in cases() {
        let (case, _) = load_case(&dir);
        let ids: Array2<i64> = read_npy(dir.join("input_ids.npy")).unwrap();
        let mask: Array2<i64> = read_npy(dir.join("attention_mask.npy")).unwrap();
        for (i, phrase) in case.concepts.iter().enumerate() {
            let tokens = shared.tokenizer.encode(phrase).unwrap();
            assert_eq!(
                tokens.ids,
                ids.row(i).to_vec(),
                "{}: ids of {phrase:?}",
                dir.display()
            );
            assert_eq!(
                tokens.mask,
                mask.row(i).to_vec(),
                "{}: mask of {phrase:?}",
                dir.display()
            );
        }
    }
    let wall = shared.tokenizer.encode("wall").unwrap();
    assert_eq!(&wall.ids[..3], &[49406, 2569, 49407]);
}

#[tokio::test]
async fn preprocessing_matches_pil_within_two_levels() {
    let shared = segmenter_svc::server::load(&common::test_config())
        .await
        .unwrap();
    for dir in cases() {
        let (case, _) = load_case(&dir);
        let bytes = std::fs::read(dir.join(&case.image)).unwrap();
        let prepared = shared.preprocessor.from_encoded(&bytes).unwrap();
        assert_eq!(
            (prepared.width, prepared.height),
            (case.oriented_width, case.oriented_height),
            "EXIF orientation"
        );
        let reference: Array4<f32> = read_npy(dir.join("pixel_values.npy")).unwrap();
        let reference = reference.as_slice().unwrap();
        // Compared as normalised floats, whichever form the graph takes (the u8 input is normalised in the graph).
        let pixels = shared.preprocessor.normalised(&prepared.pixels);
        assert_eq!(reference.len(), pixels.len());
        let diffs: Vec<f32> = reference
            .iter()
            .zip(&pixels)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let max = diffs.iter().cloned().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        // One 8-bit step is 2/255 after normalisation. The JPEG decoders (libjpeg in PIL, zune-jpeg here) may differ
        // by one step, and the two resamplers' rounding by another: at most two steps anywhere, tiny on average.
        assert!(
            max <= 4.0 / 255.0 + 1e-4 && mean < 2e-3,
            "{}: max |Δ| {max}, mean {mean}",
            dir.display()
        );
        eprintln!("{}: pixels max |Δ| {max:.4}, mean {mean:.5}", dir.display());
    }
}

#[tokio::test]
async fn model_outputs_match_pytorch() {
    let shared = check_parity(common::test_config()).await;
    // The bundled export's decoder returns its best 16 of 20 queries: the configured 20 is capped there.
    assert_eq!(reported_instance_cap(&shared), 16);
    assert_eq!(shared.max_instances, 16);
}

/// The per-concept instance limit GetModelInfo reports.
fn reported_instance_cap(shared: &segmenter_svc::service::Shared) -> u32 {
    shared
        .info
        .limits
        .as_ref()
        .unwrap()
        .max_instances_per_concept
}

/// A model exported before the decoder selected its top-k queries (or with `--topk 0`): dense outputs, read the
/// old way. Same weights, so the same references.
#[tokio::test]
async fn dense_decoder_exports_still_match_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let dense = common::fixtures_dir().join("../dense-decoder");
    for file in ["decoder.onnx", "manifest.json"] {
        std::fs::copy(dense.join(file), dir.path().join(file)).unwrap();
    }
    for file in ["vision.onnx", "text.onnx", "tokenizer.json"] {
        std::fs::copy(common::tiny_model_dir().join(file), dir.path().join(file)).unwrap();
    }
    let mut config = common::test_config();
    config.model_dir = Some(dir.path().to_path_buf());
    let shared = check_parity(config).await;
    assert_eq!(
        reported_instance_cap(&shared),
        20,
        "no top-k cap on a dense export"
    );
}

/// A model exported before the vision graph normalised the image itself (or with `--image-input f32`): the host
/// sends normalised float32 CHW pixels. Same weights, so the same references.
#[tokio::test]
async fn f32_image_input_exports_still_match_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let f32_vision = common::fixtures_dir().join("../f32-vision");
    for file in ["vision.onnx", "manifest.json"] {
        std::fs::copy(f32_vision.join(file), dir.path().join(file)).unwrap();
    }
    for file in ["decoder.onnx", "text.onnx", "tokenizer.json"] {
        std::fs::copy(common::tiny_model_dir().join(file), dir.path().join(file)).unwrap();
    }
    let mut config = common::test_config();
    config.model_dir = Some(dir.path().to_path_buf());
    let shared = check_parity(config).await;
    assert_eq!(
        shared.preprocessor.input,
        segmenter_svc::model::manifest::ImageInput::F32Chw
    );
}

/// Static-shape decoder sessions (DECODER_STATIC_BATCHES): the fixed 2- and 4-phrase sessions run the reference
/// cases' 1 (probe), 2 and 3 phrases padded up to their count, and give the PyTorch references' instances.
#[tokio::test]
async fn static_shape_decoder_sessions_match_pytorch() {
    let mut config = common::test_config();
    config.decoder_static_batches = vec![4, 2];
    config.decoder_chunk = 4;
    check_parity(config).await;
}

/// The static sessions with fixed-address inputs and outputs, what SEGMENTER_CUDA_GRAPHS runs on CUDA (here
/// without the graphs, on host buffers): the vision run writes the FPN levels into the tensors the decoder sessions
/// are bound to, text rows are copied in and outputs copied out around each run. First 1 (probe), 2 and 3 phrases on
/// the 2- and 4-phrase sessions; then with only a 2-phrase session, so 3 phrases run on the dynamic graph, reading
/// the same fixed FPN tensors through views.
#[tokio::test]
async fn fixed_address_decoder_io_matches_pytorch() {
    for statics in [vec![4, 2], vec![2]] {
        let mut config = common::test_config();
        config.fixed_decoder_io = true;
        config.decoder_static_batches = statics;
        config.decoder_chunk = 4;
        config.max_batch_images = 1;
        check_parity(config).await;
    }
}

/// SEGMENTER_VISION_STATIC: the vision session built for one image (B fixed at 1, its shape arithmetic folded),
/// one image per vision run; alone, then with the fixed-address decoder I/O that CUDA graphs use (which reads the
/// vision session's outputs).
#[tokio::test]
async fn a_one_image_vision_session_matches_pytorch() {
    for fixed_io in [false, true] {
        let mut config = common::test_config();
        config.vision_static = true;
        config.max_batch_images = 1;
        if fixed_io {
            config.fixed_decoder_io = true;
            config.decoder_static_batches = vec![2, 4];
        }
        check_parity(config).await;
    }
}

/// The one-image vision session with the fixed-address input SEGMENTER_CUDA_GRAPHS gives it when it is captured
/// (each photo copied into one tensor allocated once, the FPN levels written to fixed tensors; here without the
/// graph, on host buffers): read by the dynamic decoder alone, then also by fixed-address static decoder sessions.
/// Every reference case runs through the same input tensor in turn, so a photo left over from the one before would
/// show.
#[tokio::test]
async fn a_fixed_address_vision_input_matches_pytorch() {
    for statics in [vec![], vec![2, 4]] {
        let mut config = common::test_config();
        config.vision_static = true;
        config.fixed_vision_io = true;
        config.max_batch_images = 1;
        config.fixed_decoder_io = !statics.is_empty();
        config.decoder_static_batches = statics;
        config.decoder_chunk = 4;
        check_parity(config).await;
    }
}

/// SEGMENTER_PINNED_OUTPUTS's path with its buffers in ordinary host memory: the decoder's mask outputs
/// preallocated once per session and phrase count, reused run after run. On the dynamic graph alone (1, 2 and 3
/// phrases: three sets of buffers), then on the 2- and 4-phrase static sessions.
#[tokio::test]
async fn preallocated_decoder_outputs_match_pytorch() {
    for statics in [vec![], vec![4, 2]] {
        let mut config = common::test_config();
        config.preallocated_decoder_outputs = true;
        config.decoder_static_batches = statics;
        config.decoder_chunk = 4;
        check_parity(config).await;
    }
}

async fn check_parity(
    config: segmenter_svc::Config,
) -> std::sync::Arc<segmenter_svc::service::Shared> {
    let shared = segmenter_svc::server::load(&config).await.unwrap();
    let mut health = shared.engine.health();
    tokio::time::timeout(
        Duration::from_secs(60),
        health.wait_for(|h| *h == Health::Serving),
    )
    .await
    .unwrap()
    .unwrap();
    for dir in cases() {
        let (case, expected) = load_case(&dir);
        let pixels: Array4<f32> = read_npy(dir.join("pixel_values.npy")).unwrap();
        let ids: Array2<i64> = read_npy(dir.join("input_ids.npy")).unwrap();
        let mask: Array2<i64> = read_npy(dir.join("attention_mask.npy")).unwrap();
        let pred_masks: ArrayD<f32> = read_npy(dir.join("pred_masks.npy")).unwrap();
        // Distinct phrases only, as the service sends them; keep a map back to the reference rows.
        let mut phrases: Vec<(String, Tokens)> = Vec::new();
        let mut rows = Vec::new();
        for (i, phrase) in case.concepts.iter().enumerate() {
            if !phrases.iter().any(|(p, _)| p == phrase) {
                let tokens = Tokens {
                    ids: ids.row(i).to_vec(),
                    mask: mask.row(i).to_vec(),
                    full_len: 0,
                };
                phrases.push((phrase.clone(), tokens));
                rows.push(i);
            }
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        shared
            .engine
            .submit(Job {
                pixels: shared
                    .preprocessor
                    .from_normalised(pixels.as_slice().unwrap()),
                image_size: (case.oriented_width, case.oriented_height),
                phrases,
                filter: FilterParams {
                    threshold: case.score_threshold,
                    max_instances: 100,
                    keep_semantic: true,
                },
                deadline: Instant::now() + Duration::from_secs(60),
                enqueued: Instant::now(),
                reply,
                span: tracing::Span::none(),
            })
            .unwrap();
        let output = answer.await.unwrap().unwrap();
        let mut masks = MaskParity::default();
        for (k, &row) in rows.iter().enumerate() {
            let got = &output.concepts[k];
            let want = &expected.concepts[row];
            assert!(
                (got.presence - want.presence_score).abs() < 1e-3,
                "{}: presence",
                dir.display()
            );
            let got_q: Vec<u32> = got.instances.iter().map(|i| i.query).collect();
            let want_q: Vec<u32> = want.instances.iter().map(|i| i.query).collect();
            assert_eq!(
                got_q,
                want_q,
                "{}: kept queries of concept {row}",
                dir.display()
            );
            assert!(!got_q.is_empty(), "each reference case keeps instances");
            for (g, w) in got.instances.iter().zip(&want.instances) {
                assert!(
                    (g.score - w.score).abs() < 1e-3,
                    "score {} vs {}",
                    g.score,
                    w.score
                );
                for c in 0..4 {
                    assert!(
                        (g.bbox[c] - w.bbox[c]).abs() < 0.5,
                        "box {:?} vs {:?}",
                        g.bbox,
                        w.bbox
                    );
                }
                let plane = pred_masks
                    .index_axis(ndarray::Axis(0), row)
                    .index_axis(ndarray::Axis(0), g.query as usize)
                    .into_dimensionality::<Ix2>()
                    .unwrap()
                    .to_owned();
                let reference = plane.as_slice().unwrap();
                masks.add(&g.mask, reference, g.bbox, &case);
            }
        }
        masks.assert_close(&dir);
    }
    shared
}

/// Kept instances' masks against the PyTorch logits of the same queries: logits within 1e-2 (float32 exports), or
/// codes within one of round(σ(logit) · 255) (uint8 exports); either way the same pixels at the model's resolution
/// and nearly the same at the photo's (RLE through the server's own upsampling).
#[derive(Default)]
struct MaskParity {
    worst_logit: f32,
    worst_code: i32,
    /// Pixels of model-resolution masks (logit > 0 against the reference), intersection and union.
    model_px: (usize, usize),
    /// The same at the photo's resolution, from the server's COCO RLE.
    photo_px: (usize, usize),
}

impl MaskParity {
    fn add(&mut self, got: &MaskPlane, reference: &[f32], bbox: [f32; 4], case: &Case) {
        match got {
            MaskPlane::Logits(logits) => {
                for (a, b) in logits.iter().zip(reference) {
                    self.worst_logit = self.worst_logit.max((a - b).abs());
                }
            }
            MaskPlane::ProbabilityU8(codes) => {
                let want = segmenter_svc::postprocess::to_probability_u8(reference);
                for (a, b) in codes.iter().zip(&want) {
                    self.worst_code = self.worst_code.max((i32::from(*a) - i32::from(*b)).abs());
                }
            }
        }
        let logits = got.logits();
        let pairs = logits
            .iter()
            .zip(reference)
            .map(|(a, b)| (*a > 0.0, *b > 0.0));
        add_pixels(&mut self.model_px, pairs);
        let m = (reference.len() as f64).sqrt() as usize;
        let (w, h) = (case.oriented_width, case.oriented_height);
        let rle = |l: &[f32]| {
            expand_rle(&segmenter_svc::postprocess::rle_from_logits(
                l, m, bbox, w, h,
            ))
        };
        let (a, b) = (rle(&logits), rle(reference));
        add_pixels(&mut self.photo_px, a.into_iter().zip(b));
    }

    fn assert_close(&self, dir: &Path) {
        let iou = |(inter, union): (usize, usize)| {
            if union == 0 {
                1.0
            } else {
                inter as f64 / union as f64
            }
        };
        let (model, photo) = (iou(self.model_px), iou(self.photo_px));
        assert!(
            self.worst_logit < 1e-2 && self.worst_code <= 1,
            "{}: mask logits max |Δ| {}, codes max |Δ| {}",
            dir.display(),
            self.worst_logit,
            self.worst_code
        );
        assert!(
            model >= 0.999 && photo >= 0.99,
            "{}: mask IoU {model:.4} at the model's resolution, {photo:.4} at the photo's",
            dir.display()
        );
        eprintln!(
            "{}: model parity ok, mask logits max |Δ| {:.2e}, codes max |Δ| {}, mask IoU {model:.4} (model \
             pixels) / {photo:.4} (photo pixels, RLE)",
            dir.display(),
            self.worst_logit,
            self.worst_code
        );
    }
}

fn add_pixels(px: &mut (usize, usize), pairs: impl Iterator<Item = (bool, bool)>) {
    for (a, b) in pairs {
        px.0 += usize::from(a && b);
        px.1 += usize::from(a || b);
    }
}

/// COCO RLE counts (background first) as one bool per pixel.
fn expand_rle(counts: &[u32]) -> Vec<bool> {
    counts
        .iter()
        .enumerate()
        .flat_map(|(i, &c)| std::iter::repeat_n(i % 2 == 1, c as usize))
        .collect()
}
