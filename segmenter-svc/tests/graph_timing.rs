//! model/graph_timing.rs: any graph file timed on the serving settings (what segmenter-bench --time-sections runs
//! on each prefix bench/graph_sections.py cuts), here on the bundled tiny model's own graphs, on the CPU provider.

use palette_testing::segmenter as common;

use segmenter_svc::error::ModelError;
use segmenter_svc::model::graph_timing::time_graph;
use segmenter_svc::model::manifest::Manifest;

#[test]
fn each_graph_of_the_bundled_model_is_timed_at_the_asked_size() {
    let config = common::test_config();
    let dir = common::tiny_model_dir();
    let manifest = Manifest::load(&dir).unwrap();
    // The decoder at 2 phrases (its N), vision at 1 image (its B); the text encoder's i64 inputs are fed too.
    // One session per graph, timed at each size.
    for (file, sizes) in [
        ("decoder.onnx", &[1, 2][..]),
        ("vision.onnx", &[1][..]),
        ("text.onnx", &[3][..]),
    ] {
        let timings = time_graph(&config, &manifest, &dir.join(file), sizes, 1, 3).unwrap();
        assert_eq!(
            timings.iter().map(|t| t.size).collect::<Vec<_>>(),
            sizes,
            "{file}"
        );
        for timing in &timings {
            assert_eq!(timing.runs, 3, "{file}");
            assert_eq!(timing.build_ms, timings[0].build_ms, "one build");
            assert!(
                timing.min_ms > 0.0 && timing.min_ms <= timing.p50_ms,
                "{file}: {timing:?}"
            );
        }
    }
}

#[test]
fn a_missing_graph_is_a_session_error_naming_the_file() {
    let config = common::test_config();
    let dir = common::tiny_model_dir();
    let manifest = Manifest::load(&dir).unwrap();
    let missing = dir.join("no-such-prefix.onnx");
    match time_graph(&config, &manifest, &missing, &[1], 0, 1) {
        Err(ModelError::Session { detail, .. }) => {
            assert!(detail.contains("no-such-prefix.onnx"), "{detail}")
        }
        other => panic!("expected a session error, got {other:?}"),
    }
}
