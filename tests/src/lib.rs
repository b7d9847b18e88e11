//! End-to-end test support: both services in-process on 127.0.0.1:0 with the bundled tiny model, and the example
//! photos the README's quick start uses.

pub mod room_segmenter;
pub mod s3;

/// A rule's `params` as the protobuf Struct the Jobs API takes, from (name, value) pairs.
pub fn rule_params(pairs: &[(&str, prost_types::value::Kind)]) -> Option<prost_types::Struct> {
    Some(prost_types::Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    prost_types::Value {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect(),
    })
}

pub use palette_testing::segmenter::tiny_model_dir;
pub use palette_testing::server::repo_root;

/// The bundled example photos (room, product, a phone shot with EXIF orientation), as JPEG bytes.
pub fn example_photos() -> Vec<(String, Vec<u8>)> {
    let dir = repo_root().join("segmenter-svc/tests/fixtures/reference/images");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("example images")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            // Input keys are .jpg by contract: re-encode anything else (EXIF-carrying JPEGs stay untouched).
            let jpeg = if bytes.starts_with(&[0xFF, 0xD8]) {
                bytes
            } else {
                let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
                let mut out = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
                    .encode_image(&img)
                    .unwrap();
                out
            };
            (
                path.file_name().unwrap().to_string_lossy().to_string(),
                jpeg,
            )
        })
        .collect()
}

pub use palette_testing::server::Running;

/// The segmenter with the tiny model on the CPU, SERVING when this returns.
pub async fn start_segmenter() -> Running<anyhow::Error> {
    palette_testing::segmenter::start_default().await
}

/// The orchestrator with `config` (its grpc_addr is ignored: port 0), SERVING when this returns.
pub async fn start_orchestrator(config: orchestrator_svc::Config) -> Running<anyhow::Error> {
    palette_testing::orchestrator::start_with(config).await
}

/// A synthetic "room" photo as JPEG (q90): a shaded wall over a floor, a block of furniture; `seed` varies it, so
/// photos with different seeds are different bytes (no mask reuse between them).
pub fn synthetic_room(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let wall = y < h * 3 / 5;
        let sofa = x > w / 4 + seed % 50 && x < w * 3 / 4 && y > h / 2 && y < h * 4 / 5;
        let shade = ((x + seed * 7) % 97) as u8 / 4;
        if sofa {
            image::Rgb([40 + shade, 60, 110])
        } else if wall {
            image::Rgb([200 - shade, 196 - shade, 186])
        } else {
            image::Rgb([120 + shade, 80, 50])
        }
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .expect("in-memory JPEG");
    out
}

/// CPU seconds this process has used so far, all threads (utime + stime from /proc/self/stat; 0 elsewhere).
pub fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces: fields are counted after its closing ")". utime and stime are fields 14
    // and 15 of the line, 11 and 12 after the ")".
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Each stage's `_sum` of histogram `name` in Prometheus text (`name_sum{stage="..."} value`), in seconds.
pub fn stage_sums(metrics: &str, name: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}_sum{{stage=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (stage, value) = rest.split_once("\"} ")?;
            Some((stage.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}
