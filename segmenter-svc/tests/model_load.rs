//! What startup checks and sets up before the first request: tensor types against the manifest, the serving
//! defaults per provider, ONNX Runtime profiles on request.

use palette_testing::segmenter as common;

use std::path::Path;
use std::time::Duration;

use segmenter_svc::engine::Health;

/// A copy of the bundled tiny model whose manifest went through `edit`.
fn edited_model(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::tiny_model_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    dir
}

fn config_for(dir: &Path) -> segmenter_svc::Config {
    let mut config = common::test_config();
    config.model_dir = Some(dir.to_path_buf());
    config
}

async fn load_error(config: &segmenter_svc::Config) -> String {
    match segmenter_svc::server::load(config).await {
        Ok(_) => panic!("the model loaded"),
        Err(e) => format!("{e:#}"),
    }
}

/// An export made before the hints were flat wrote them per graph: refused by name, not ignored (its memory-pattern
/// switch read as off, and the fp16 vision graph then failed its warm-up on the CUDA EP without naming the manifest).
#[tokio::test]
async fn per_graph_session_hints_of_an_older_export_stop_startup() {
    let dir = edited_model(|m| {
        m["session_hints"] = serde_json::json!({"vision": {"disable_memory_pattern": true}});
    });
    let error = load_error(&config_for(dir.path())).await;
    assert!(
        error.contains("session_hints.vision") && error.contains("re-export"),
        "{error}"
    );
}

#[tokio::test]
async fn a_tensor_type_that_differs_from_the_manifest_stops_startup() {
    // The manifest claims int32 for the decoder's text mask; the graph takes int64 (and so does the server).
    let dir = edited_model(|m| {
        for input in m["graphs"]["decoder"]["inputs"].as_array_mut().unwrap() {
            if input["name"] == "text_mask" {
                input["dtype"] = "int32".into();
            }
        }
    });
    let error = load_error(&config_for(dir.path())).await;
    assert!(
        error.contains("decoder input \"text_mask\"")
            && error.contains("the graph has i64")
            && error.contains("the manifest says int32"),
        "{error}"
    );
}

#[tokio::test]
async fn a_graph_whose_types_the_server_cannot_feed_stops_startup() {
    // Manifest and graph could agree on float16 pixels (an export without fp32 I/O); the server feeds u8 for
    // `image_u8`. Here the manifest says float16 and the graph says u8: refused either way, naming all three.
    let dir = edited_model(|m| {
        m["graphs"]["vision"]["inputs"][0]["dtype"] = "float16".into();
    });
    let error = load_error(&config_for(dir.path())).await;
    assert!(
        error.contains("vision input \"image_u8\"")
            && error.contains("the graph has u8")
            && error.contains("the server uses u8"),
        "{error}"
    );
}

#[tokio::test]
async fn sizes_that_differ_from_the_graphs_stop_startup() {
    // mask_size 96 made the warm-up slice past the decoder's 48 x 48 planes (a panic of the inference thread,
    // then "warming up" for ever); 24 cut every mask at the wrong offsets without a word.
    // text_context_length 16 padded every phrase to 16 tokens for graphs that take 32: the warm-up failed on an ONNX
    // Runtime shape error that named no setting.
    for (field, value) in [
        ("mask_size", 96),
        ("mask_size", 24),
        ("image_size", 336),
        ("text_context_length", 16),
    ] {
        let dir = edited_model(|m| m[field] = value.into());
        let error = load_error(&config_for(dir.path())).await;
        assert!(
            error.contains(&format!("the manifest's {field} is {value}")),
            "{field} {value}: {error}"
        );
    }
}

#[tokio::test]
async fn an_unknown_dtype_in_the_manifest_is_named() {
    let dir = edited_model(|m| {
        m["graphs"]["text"]["outputs"][0]["dtype"] = "float128".into();
    });
    let error = load_error(&config_for(dir.path())).await;
    assert!(error.contains("unknown dtype \"float128\""), "{error}");
}

#[tokio::test]
async fn cpu_defaults_batch_four_images_and_profiles_are_written_on_request() {
    let profiles = tempfile::tempdir().unwrap();
    let mut config = common::test_config();
    assert_eq!(
        config.max_batch_images, 0,
        "0 = the provider's default by default"
    );
    config.ort_profile_dir = Some(profiles.path().join("ort"));
    let shared = segmenter_svc::server::load(&config).await.unwrap();
    let limits = shared.info.limits.unwrap();
    assert_eq!(limits.max_batch_images, 4, "CPU default");
    let mut health = shared.engine.health();
    tokio::time::timeout(
        Duration::from_secs(60),
        health.wait_for(|h| *h == Health::Serving),
    )
    .await
    .unwrap()
    .unwrap();
    // Dropping the last handle stops the engine, which ends profiling before it reports Stopped.
    drop(shared);
    tokio::time::timeout(
        Duration::from_secs(60),
        health.wait_for(|h| *h == Health::Stopped),
    )
    .await
    .unwrap()
    .unwrap();
    let mut written: Vec<String> = std::fs::read_dir(profiles.path().join("ort"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written.len(), 3, "{written:?}");
    for (file, graph) in written.iter().zip(["decoder", "text", "vision"]) {
        assert!(
            file.starts_with(graph) && file.ends_with(".json"),
            "{written:?}"
        );
        let trace: serde_json::Value =
            serde_json::from_slice(&std::fs::read(profiles.path().join("ort").join(file)).unwrap())
                .unwrap();
        assert!(
            trace.as_array().is_some_and(|events| !events.is_empty()),
            "{file}: not a Chrome trace"
        );
    }
}

#[tokio::test]
async fn a_text_cache_smaller_than_one_batch_of_phrases_stops_startup() {
    let mut config = common::test_config();
    config.max_concepts = 32;
    config.max_batch_images = 4;
    config.text_cache_entries = 100;
    let error = load_error(&config).await;
    assert!(
        error.contains("TEXT_CACHE_ENTRIES=100") && error.contains("= 128"),
        "{error}"
    );
}

#[tokio::test]
async fn cuda_graphs_are_refused_where_they_cannot_work() {
    // On the CPU provider.
    let mut config = common::test_config();
    config.cuda_graphs = true;
    config.decoder_static_batches = vec![1, 2, 4];
    config.max_batch_images = 1;
    let error = load_error(&config).await;
    assert!(
        error.contains("SEGMENTER_CUDA_GRAPHS=true needs the CUDA provider"),
        "{error}"
    );
    // With more than one inference thread (a capture fails while another instance runs).
    config.engine_instances = 2;
    let error = load_error(&config).await;
    assert!(
        error.contains("SEGMENTER_CUDA_GRAPHS=true needs ENGINE_INSTANCES=1 (it is 2)"),
        "{error}"
    );
    config.engine_instances = 1;
    // With no session whose shapes are all fixed.
    config.decoder_static_batches = vec![];
    let error = load_error(&config).await;
    assert!(
        error.contains(
            "SEGMENTER_CUDA_GRAPHS=true needs SEGMENTER_VISION_STATIC=true or DECODER_STATIC_BATCHES"
        ),
        "{error}"
    );
    // The tests' fixed-I/O switches need the sessions they bind: a vision input without the one-image vision
    // session, decoder I/O without static-shape decoder sessions; and one image per vision run (they go through the
    // same checks as the CUDA one).
    config.cuda_graphs = false;
    config.fixed_vision_io = true;
    let error = load_error(&config).await;
    assert!(
        error.contains("a fixed-address vision input needs SEGMENTER_VISION_STATIC=true"),
        "{error}"
    );
    config.fixed_vision_io = false;
    config.fixed_decoder_io = true;
    config.decoder_static_batches = vec![];
    let error = load_error(&config).await;
    assert!(error.contains("needs DECODER_STATIC_BATCHES"), "{error}");
    config.decoder_static_batches = vec![2];
    config.max_batch_images = 0;
    let error = load_error(&config).await;
    assert!(
        error.contains("needs MAX_BATCH_IMAGES=1 (it is 4)"),
        "{error}"
    );
}

#[tokio::test]
async fn pinned_outputs_are_refused_on_the_cpu() {
    let mut config = common::test_config();
    config.pinned_outputs = true;
    let error = load_error(&config).await;
    assert!(
        error.contains("SEGMENTER_PINNED_OUTPUTS=true needs the CUDA provider"),
        "{error}"
    );
}

#[tokio::test]
async fn a_one_image_vision_session_needs_one_image_per_run() {
    let mut config = common::test_config();
    config.vision_static = true; // the CPU default batches 4 images
    let error = load_error(&config).await;
    assert!(
        error.contains(
            "SEGMENTER_VISION_STATIC=true needs MAX_BATCH_IMAGES=1 (it is 4, the CPU default)"
        ),
        "{error}"
    );
    config.max_batch_images = 2;
    let error = load_error(&config).await;
    assert!(error.contains("(it is 2)"), "{error}");
}

/// SEGMENTER_PINNED_OUTPUTS preallocates the mask outputs only: the small ones (TopK, Gather and Reshape outputs)
/// are left to ONNX Runtime, whose handling of a preallocated buffer for them failed on CUDA.
#[test]
fn only_the_mask_outputs_are_preallocated() {
    let env = segmenter_svc::model::runtime::load_runtime(&common::ort_dylib()).unwrap();
    let decoder = ort::session::Session::builder(&env)
        .unwrap()
        .commit_from_file(common::tiny_model_dir().join("decoder.onnx"))
        .unwrap();
    let mut large = segmenter_svc::model::host_outputs::large_outputs(decoder.outputs());
    large.sort_unstable();
    assert_eq!(large, ["semantic_seg", "topk_masks"]);
}

#[tokio::test]
async fn mask_outputs_of_mixed_types_stop_startup() {
    // The bundled decoder returns uint8 masks and semantic maps; a manifest that says one of them is float32 is
    // refused before any session is built.
    let dir = edited_model(|m| {
        for output in m["graphs"]["decoder"]["outputs"].as_array_mut().unwrap() {
            if output["name"] == "semantic_seg" {
                output["dtype"] = "float32".into();
            }
        }
    });
    let error = load_error(&config_for(dir.path())).await;
    assert!(
        error.contains("must all be float32 (logits) or all uint8")
            && error.contains("[\"uint8\", \"float32\"]"),
        "{error}"
    );
}

/// MODEL_DIR is usually a symlink the exporter switches (FORCE_EXPORT): it is resolved once, so a switch during the
/// load cannot mix two exports' files; loading through the link works, and a folder that is not there is named.
#[tokio::test]
async fn a_model_dir_behind_a_symlink_loads_and_a_missing_one_is_named() {
    let export = edited_model(|_| {});
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("sam3");
    std::os::unix::fs::symlink(export.path(), &link).unwrap();
    assert!(
        segmenter_svc::server::load(&config_for(&link))
            .await
            .is_ok()
    );
    let missing = load_error(&config_for(&links.path().join("not-exported"))).await;
    assert!(missing.contains("MODEL_DIR"), "{missing}");
    assert!(missing.contains("not-exported"), "{missing}");
}
