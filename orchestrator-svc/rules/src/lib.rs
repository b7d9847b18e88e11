//! Rule engine: recolour, tone, texture and remove on soft, edge-aware masks. Pure functions on image buffers:
//! masks in (model-resolution probabilities), a region out (`region::build_region`), an edited image out (`apply`).

pub mod color;
pub mod contact;
pub mod filter;
mod grid_rows;
pub mod guide_stats;
pub mod guided;
pub mod icc;
pub mod inpaint;
pub mod light;
pub mod lut;
pub mod mask;
mod morph;
pub mod ops;
pub mod preset;
pub mod region;
mod row_kernels;
pub mod rule;
pub mod simd;
mod spare;
pub mod swatch;
pub mod synth;

pub use image::{GrayImage, RgbImage, RgbaImage};
pub use region::RegionParams;

use rule::{FieldError, RemoveMode, Rule, SwatchSource};

/// The result of a rule: RGB, or RGBA for a cut-out.
#[derive(Clone, Debug, PartialEq)]
pub enum Edited {
    Rgb(RgbImage),
    Rgba(RgbaImage),
}

impl Edited {
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Edited::Rgb(i) => i.dimensions(),
            Edited::Rgba(i) => i.dimensions(),
        }
    }
}

/// Applies a rule within the soft region (same size as the photo). `swatch`: the texture when the rule names one
/// by object key, in linear light (`LinearSwatch::from_rgb`: a caller applying it to many photos prepares it once).
pub fn apply(
    photo: &RgbImage,
    region: &GrayImage,
    rule: &Rule,
    swatch: Option<&swatch::LinearSwatch>,
) -> Result<Edited, FieldError> {
    if let Rule::Remove(p) = rule
        && p.mode == RemoveMode::Cutout
    {
        check_size(photo, region)?;
        return Ok(Edited::Rgba(ops::remove::cutout(photo, region, p)));
    }
    let mut out = photo.clone();
    match apply_in_place(&mut out, region, rule, swatch)? {
        InPlace::Edited => Ok(Edited::Rgb(out)),
        InPlace::Cutout(rgba) => Ok(Edited::Rgba(rgba)),
    }
}

/// What `apply_in_place` did.
#[derive(Debug)]
pub enum InPlace {
    /// The photo was edited where the region is non-zero; no other pixel was written.
    Edited,
    /// A cut-out: the photo is untouched, this is the output.
    Cutout(RgbaImage),
}

/// [`apply`] on the photo itself: a caller rendering several rules of one photo edits one buffer and restores the
/// region's box from the original between rules, instead of a full-frame copy per rule (at 12 MP a 36 MB copy and
/// its page faults per rule). The same arithmetic as `apply`, so the same bytes.
pub fn apply_in_place(
    photo: &mut RgbImage,
    region: &GrayImage,
    rule: &Rule,
    swatch: Option<&swatch::LinearSwatch>,
) -> Result<InPlace, FieldError> {
    check_size(photo, region)?;
    match rule {
        Rule::Recolor(p) => ops::recolor::recolor_in_place(photo, region, p),
        Rule::Tone(p) => ops::tone::tone_in_place(photo, region, p),
        Rule::Texture(p) => {
            let sw = match (&p.source, swatch) {
                (SwatchSource::Builtin(b), _) => swatch::builtin(*b),
                (SwatchSource::Key(_), Some(s)) if s.width > 0 && s.height > 0 => s,
                (SwatchSource::Key(k), _) => {
                    return Err(FieldError::new(
                        "params.swatch",
                        format!("swatch {k:?} was not supplied or is empty"),
                    ));
                }
            };
            ops::texture::texture_in_place(photo, region, p, sw)
        }
        Rule::Remove(p) => match p.mode {
            RemoveMode::Cutout => {
                return Ok(InPlace::Cutout(ops::remove::cutout(photo, region, p)));
            }
            RemoveMode::Fill => ops::remove::fill_in_place(photo, region, p),
        },
    }
    Ok(InPlace::Edited)
}

fn check_size(photo: &RgbImage, region: &GrayImage) -> Result<(), FieldError> {
    if region.dimensions() != photo.dimensions() {
        return Err(FieldError::new(
            "region",
            format!(
                "region is {:?} but the photo is {:?}",
                region.dimensions(),
                photo.dimensions()
            ),
        ));
    }
    Ok(())
}
