//! Command line for trying rules on files: `apply`, `contact-sheet` and `demo` (a synthetic room, every rule).

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use palette_rules::{
    Edited, GrayImage, RgbImage, apply, contact, icc, preset, region, rule, swatch, synth,
};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(version, about = "Apply palette rules to images")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply one rule to an image within a mask.
    Apply {
        #[arg(long)]
        image: PathBuf,
        /// Grayscale mask (any size; stretched to the image), white = the target.
        #[arg(long)]
        mask: PathBuf,
        /// Masks of things in front of the target (subtracted from the region).
        #[arg(long)]
        occluder: Vec<PathBuf>,
        /// The rule as JSON: {"type": "recolor", "params": {"color": "#123456"}}.
        #[arg(long)]
        rule: String,
        /// Swatch image for texture rules that name one by key.
        #[arg(long)]
        swatch: Option<PathBuf>,
        /// Preset directory and name whose rule defaults sit under the params.
        #[arg(long, requires = "preset")]
        presets_dir: Option<PathBuf>,
        #[arg(long)]
        preset: Option<String>,
        /// Output file; cut-outs need a format with alpha (PNG/WebP).
        #[arg(long)]
        out: PathBuf,
    },
    /// Before/after grid: give --before/--after once per pair, in order.
    ContactSheet {
        #[arg(long, required = true)]
        before: Vec<PathBuf>,
        #[arg(long, required = true)]
        after: Vec<PathBuf>,
        /// Row height in pixels.
        #[arg(long, default_value_t = 360)]
        height: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Render every rule on a synthetic room into a folder, plus sheet.png; light paints on a wall by a window into
    /// window-sheet.png.
    Demo {
        #[arg(long)]
        out_dir: PathBuf,
        /// Image width (height is 3/4 of it).
        #[arg(long, default_value_t = 1008)]
        width: u32,
    },
}

/// Opens an image by content (not extension), converts an embedded ICC profile to sRGB and applies its EXIF
/// orientation, as the services do: a phone photo shows upright and in its colours, and a PNG stored under a .jpg
/// key still opens.
fn open_upright(p: &Path) -> Result<image::DynamicImage> {
    use image::ImageDecoder;
    let read = || -> image::ImageResult<image::DynamicImage> {
        let mut decoder = image::ImageReader::open(p)?
            .with_guessed_format()?
            .into_decoder()?;
        let orientation = decoder.orientation()?;
        let icc = decoder.icc_profile().ok().flatten();
        let mut img = image::DynamicImage::from_decoder(decoder)?;
        img.apply_orientation(orientation);
        // Photos only: masks are grey, and a cut-out's alpha would be lost going through RGB.
        if let Some(icc) = icc.filter(|_| !img.color().has_alpha() && img.color().has_color()) {
            let mut rgb = img.into_rgb8();
            if let icc::Conversion::Ignored(reason) = icc::to_srgb(&mut rgb, &icc) {
                eprintln!("{}: colour profile ignored ({reason})", p.display());
            }
            img = image::DynamicImage::ImageRgb8(rgb);
        }
        Ok(img)
    };
    read().with_context(|| format!("reading {}", p.display()))
}

fn load_gray(p: &Path, w: u32, h: u32) -> Result<GrayImage> {
    let m = open_upright(p)?.to_luma8();
    Ok(if m.dimensions() == (w, h) {
        m
    } else {
        image::imageops::resize(&m, w, h, image::imageops::FilterType::Triangle)
    })
}

fn parse_rule_json(
    text: &str,
    defaults: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<rule::Rule> {
    let v: serde_json::Value = serde_json::from_str(text).context("--rule is not JSON")?;
    let ty = v
        .get("type")
        .and_then(|t| t.as_str())
        .context("--rule needs a string \"type\"")?;
    let empty = serde_json::Map::new();
    let params = v
        .get("params")
        .and_then(|p| p.as_object())
        .unwrap_or(&empty);
    rule::parse_rule(ty, params, defaults).map_err(|errs| {
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid rule:\n  {}", lines.join("\n  "))
    })
}

fn save(e: &Edited, out: &Path) -> Result<()> {
    let res = match e {
        Edited::Rgb(i) => i.save(out),
        Edited::Rgba(i) => {
            let ext = out
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if ext == "jpg" || ext == "jpeg" {
                bail!(
                    "this rule makes a transparent cut-out; write .png or .webp, not {}",
                    out.display()
                );
            }
            i.save(out)
        }
    };
    res.with_context(|| format!("writing {}", out.display()))
}

fn to_rgb(e: &Edited) -> RgbImage {
    match e {
        Edited::Rgb(i) => i.clone(),
        Edited::Rgba(i) => contact::flatten(&image::DynamicImage::ImageRgba8(i.clone())),
    }
}

fn demo(dir: &Path, width: u32) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let room = synth::room(width, width * 3 / 4);
    let (w, h) = room.photo.dimensions();
    // Go through the model-resolution path, as the service does: 288x288 probabilities + the box.
    let model = |m: &GrayImage| {
        let probs = synth::to_model(m, 288, 288);
        let mm = palette_rules::mask::ModelMask {
            width: 288,
            height: 288,
            probs: &probs,
        };
        let b = palette_rules::mask::nonzero_bounds(m);
        let bx = palette_rules::mask::PixelBox {
            x0: b.x0 as f32,
            y0: b.y0 as f32,
            x1: b.x1 as f32,
            y1: b.y1 as f32,
        };
        palette_rules::mask::upsample_instance(&mm, bx, w, h)
    };
    let (wall, floor, sofa) = (model(&room.wall), model(&room.floor), model(&room.sofa));
    room.photo.save(dir.join("room.png"))?;
    let cases: [(&str, &GrayImage, &[GrayImage], &str); 7] = [
        (
            "recolor_navy_wall",
            &wall,
            std::slice::from_ref(&sofa),
            r##"{"type":"recolor","params":{"color":"#1f3a5f"}}"##,
        ),
        (
            "recolor_sage_wall",
            &wall,
            std::slice::from_ref(&sofa),
            r##"{"type":"recolor","params":{"color":"#9caf88","finish":"matte"}}"##,
        ),
        (
            "tone_warm_floor",
            &floor,
            std::slice::from_ref(&sofa),
            r#"{"type":"tone","params":{"brightness":0.3,"warmth":0.6,"contrast":0.2}}"#,
        ),
        (
            "texture_velvet_sofa",
            &sofa,
            &[],
            r#"{"type":"texture","params":{"builtin":"velvet","scale":0.5}}"#,
        ),
        (
            "texture_herringbone_floor",
            &floor,
            std::slice::from_ref(&sofa),
            r#"{"type":"texture","params":{"builtin":"herringbone","scale":0.5,"rotation":0}}"#,
        ),
        (
            // The floor as a plane receding from the horizon (68 % down) to the bottom edge.
            "texture_herringbone_floor_perspective",
            &floor,
            std::slice::from_ref(&sofa),
            r#"{"type":"texture","params":{"builtin":"herringbone","scale":2,
                "perspective":[[0.25,0.68],[0.75,0.68],[1.0,1.0],[0.0,1.0]],"perspective_aspect":2.0}}"#,
        ),
        (
            "remove_sofa_fill",
            &sofa,
            &[],
            r#"{"type":"remove","params":{"mode":"fill","grow":3}}"#,
        ),
    ];
    let mut pairs = Vec::new();
    for (name, target, occ, json) in cases {
        let r = parse_rule_json(json, None)?;
        let reg = region::build_region(
            &room.photo,
            std::slice::from_ref(target),
            occ,
            &r.region_params(),
        );
        let t = std::time::Instant::now();
        let e = apply(&room.photo, &reg, &r, None)?;
        println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        save(&e, &dir.join(format!("{name}.png")))?;
        pairs.push((room.photo.clone(), to_rgb(&e)));
    }
    contact::contact_sheet(&pairs, 300).save(dir.join("sheet.png"))?;
    println!("wrote {}", dir.join("sheet.png").display());
    window_demo(dir, width, &model)
}

/// The light paints are judged on: a wall by a window (fall-off, a shelf's soft shadow, a skirting board, a chair in
/// front) painted white, off-white, greige and navy, a pale floor and the wall brightened; into window-sheet.png.
fn window_demo(dir: &Path, width: u32, model: &dyn Fn(&GrayImage) -> GrayImage) -> Result<()> {
    let scene = synth::window_wall(width, width * 3 / 4, true);
    let (wall, skirting, chair, floor) = (
        model(&scene.wall),
        model(&scene.skirting),
        model(&scene.chair),
        model(&scene.floor),
    );
    scene.photo.save(dir.join("window_wall.png"))?;
    let in_front = [chair.clone(), skirting];
    let cases: [(&str, &GrayImage, &[GrayImage], &str); 6] = [
        (
            "window_white_wall",
            &wall,
            &in_front,
            r##"{"type":"recolor","params":{"color":"#ffffff"}}"##,
        ),
        (
            "window_offwhite_wall",
            &wall,
            &in_front,
            r##"{"type":"recolor","params":{"color":"#f4f1ea"}}"##,
        ),
        (
            "window_greige_wall",
            &wall,
            &in_front,
            r##"{"type":"recolor","params":{"color":"#beb3a3","finish":"matte"}}"##,
        ),
        (
            "window_navy_wall",
            &wall,
            &in_front,
            r##"{"type":"recolor","params":{"color":"#1f3a5f"}}"##,
        ),
        (
            "window_pale_marble_floor",
            &floor,
            std::slice::from_ref(&chair),
            r#"{"type":"texture","params":{"builtin":"marble","scale":0.6}}"#,
        ),
        (
            "window_brighter_wall",
            &wall,
            &in_front,
            r#"{"type":"tone","params":{"brightness":0.4}}"#,
        ),
    ];
    let mut pairs = Vec::new();
    for (name, target, occ, json) in cases {
        let r = parse_rule_json(json, None)?;
        let reg = region::build_region(
            &scene.photo,
            std::slice::from_ref(target),
            occ,
            &r.region_params(),
        );
        let e = apply(&scene.photo, &reg, &r, None)?;
        save(&e, &dir.join(format!("{name}.png")))?;
        pairs.push((scene.photo.clone(), to_rgb(&e)));
    }
    let sheet = dir.join("window-sheet.png");
    contact::contact_sheet(&pairs, 300).save(&sheet)?;
    println!("wrote {}", sheet.display());
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Apply {
            image,
            mask,
            occluder,
            rule,
            swatch,
            presets_dir,
            preset,
            out,
        } => {
            let photo = open_upright(&image)?.to_rgb8();
            let (w, h) = photo.dimensions();
            let presets = match &presets_dir {
                Some(d) => Some(preset::load_dir(d)?),
                None => None,
            };
            let ty = serde_json::from_str::<serde_json::Value>(&rule)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(String::from))
                .unwrap_or_default();
            let defaults = match (&presets, &preset) {
                (Some(all), Some(name)) => {
                    let p = all
                        .get(name)
                        .with_context(|| format!("no preset named {name:?}"))?;
                    p.rule_defaults.get(&ty)
                }
                _ => None,
            };
            let r = parse_rule_json(&rule, defaults)?;
            let target = load_gray(&mask, w, h)?;
            let occ = occluder
                .iter()
                .map(|p| load_gray(p, w, h))
                .collect::<Result<Vec<_>>>()?;
            let sw = match &swatch {
                Some(p) => Some(swatch::LinearSwatch::from_rgb(&open_upright(p)?.to_rgb8())),
                None => None,
            };
            let reg = region::build_region(&photo, &[target], &occ, &r.region_params());
            // One photo: a per-image perspective applies with its entry "0".
            let e = apply(&photo, &reg, &r.for_image(0), sw.as_ref())?;
            save(&e, &out)
        }
        Cmd::ContactSheet {
            before,
            after,
            height,
            out,
        } => {
            if before.len() != after.len() {
                bail!(
                    "give as many --after as --before ({} vs {})",
                    after.len(),
                    before.len()
                );
            }
            let open =
                |p: &PathBuf| -> Result<RgbImage> { Ok(contact::flatten(&open_upright(p)?)) };
            let pairs = before
                .iter()
                .zip(&after)
                .map(|(a, b)| Ok((open(a)?, open(b)?)))
                .collect::<Result<Vec<_>>>()?;
            contact::contact_sheet(&pairs, height)
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))
        }
        Cmd::Demo { out_dir, width } => demo(&out_dir, width),
    }
}
