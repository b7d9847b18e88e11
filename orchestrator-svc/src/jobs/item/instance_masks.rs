//! An item's instance masks as plain functions (no I/O, no runtime): each instance upsampled from model resolution
//! a row at a time straight into its stored PNG (its crop, or the full frame with `MASK_LAYOUT=full`) and the
//! concept's union, or stored as the model's grid (`MASK_LAYOUT=grid`, `crate::mask_png::grid`) and upsampled only
//! into the union. `ItemRunner` calls them on the
//! blocking pool.

use palette_rules::GrayImage;
use palette_rules::mask::{InstanceUpsampler, ModelMask, PixelBox};

use super::mask_cache::ConceptMasks;
use super::union_plane::UnionPlane;
use crate::config::MaskLayout;
use crate::mask_png::grid::{self as mask_grid, GridPlacement};
use crate::mask_png::{self, Placement};

/// One instance, as stored.
pub struct InstanceMask {
    /// The instance as stored (`masks/...png`): its crop to its non-zero pixels (see `crate::mask_png`), the
    /// model's grid (`crate::mask_png::grid`) or the full-frame mask (`MaskLayout::Full`).
    pub png: Vec<u8>,
    /// Where the instance is non-zero in the photo (the crop's placement).
    pub placement: Placement,
    /// The grid's size when stored as one; (0, 0) for a crop or a full-frame mask.
    pub grid: (u32, u32),
}

/// Upsamples one instance inside its box to `width` x `height`, a row at a time, and encodes its crop to its
/// non-zero pixels (for `MaskLayout::Grid` the model's grid with that rectangle, for `MaskLayout::Full` the whole
/// frame, zero outside it); when given `union` (the concept's union so far), folds the instance into it (max). A region is built from the union of a concept's
/// instances, so memory is one plane per concept a rule needs and none per instance: at 12 MP a full-frame plane
/// per instance (~20 per photo) cost more in page faults and zeroing than the upsample itself.
pub fn instance_mask(
    model: &ModelMask<'_>,
    bbox: PixelBox,
    (width, height): (u32, u32),
    mut union: Option<&mut UnionPlane>,
    layout: MaskLayout,
) -> InstanceMask {
    let up = InstanceUpsampler::new(model, bbox, width, height);
    let b = up.nonzero_bounds();
    if b.is_empty() {
        let png = match layout {
            MaskLayout::Full => mask_png::encode_png((width, height), &[], |_, out| out.fill(0)),
            MaskLayout::Crop | MaskLayout::Grid => {
                mask_png::encode_rows(Placement::EMPTY, |_, out| out.fill(0))
            }
        };
        return InstanceMask {
            png,
            placement: Placement::EMPTY,
            grid: (0, 0),
        };
    }
    let placement = Placement {
        x: b.x0,
        y: b.y0,
        width: b.width(),
        height: b.height(),
    };
    let mut rows = up.row_writer(b.x0, b.width() as usize);
    match layout {
        MaskLayout::Crop => {
            let png = mask_png::encode_rows(placement, |y, row| {
                rows.row(y, row);
                if let Some(union) = union.as_deref_mut() {
                    union.fold_row(y, b.x0, row);
                }
            });
            InstanceMask {
                png,
                placement,
                grid: (0, 0),
            }
        }
        MaskLayout::Full => {
            // The crop's rows at their place in zero rows of the photo's width (one row in memory, not a plane).
            let (x0, x1) = (b.x0 as usize, b.x1 as usize);
            let png = mask_png::encode_png((width, height), &[], |y, out| {
                out.fill(0);
                if (b.y0..b.y1).contains(&y) {
                    let span = &mut out[x0..x1];
                    rows.row(y, span);
                    if let Some(union) = union.as_deref_mut() {
                        union.fold_row(y, b.x0, span);
                    }
                }
            });
            InstanceMask {
                png,
                placement,
                grid: (0, 0),
            }
        }
        MaskLayout::Grid => {
            // Only a rule's concept needs the full-resolution rows (`mask_png::grid::upsample_rows` gives the same).
            if let Some(union) = union {
                let mut row = vec![0u8; b.width() as usize];
                for y in b.y0..b.y1 {
                    rows.row(y, &mut row);
                    union.fold_row(y, b.x0, &row);
                }
            }
            let at = GridPlacement {
                x: b.x0,
                y: b.y0,
                width: b.width(),
                height: b.height(),
                image_width: width,
                image_height: height,
            };
            InstanceMask {
                png: mask_grid::encode(model.probs, (model.width, model.height), &at),
                placement,
                grid: (model.width, model.height),
            }
        }
    }
}

/// Every instance of one concept (`instance_mask`), and their union when `keep_union` (a rule needs the concept).
/// Boxes are in the segmenter's view of the image; both apply EXIF orientation, so only a scale can differ.
pub fn concept_masks(
    masks: &ConceptMasks,
    (w, h): (u32, u32),
    keep_union: bool,
    layout: MaskLayout,
) -> (Vec<InstanceMask>, Option<GrayImage>) {
    let sx = w as f32 / masks.image_width.max(1) as f32;
    let sy = h as f32 / masks.image_height.max(1) as f32;
    let instances = &masks.result.instances;
    let mut union = (keep_union && !instances.is_empty()).then(|| UnionPlane::new(w, h));
    let mut out = Vec::with_capacity(instances.len());
    for instance in instances {
        let model = ModelMask {
            width: masks.mask_width,
            height: masks.mask_height,
            probs: instance.mask.as_ref().map_or(&[][..], |m| &m.data[..]),
        };
        let bbox = instance.r#box.map_or(
            PixelBox {
                x0: 0.0,
                y0: 0.0,
                x1: w as f32,
                y1: h as f32,
            },
            |b| PixelBox {
                x0: b.x0 * sx,
                y0: b.y0 * sy,
                x1: b.x1 * sx,
                y1: b.y1 * sy,
            },
        );
        out.push(instance_mask(&model, bbox, (w, h), union.as_mut(), layout));
    }
    (out, union.map(UnionPlane::into_image))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SAM-like instance at the real model's 288x288 mask resolution: saturated inside and outside, a soft edge
    /// about one model pixel wide (a sigmoid of the signed distance to an ellipse).
    fn saturated_blob(cx: f32, cy: f32, rx: f32, ry: f32) -> Vec<u8> {
        const N: usize = 288;
        (0..N * N)
            .map(|i| {
                let (x, y) = ((i % N) as f32 + 0.5, (i / N) as f32 + 0.5);
                let d = (((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2)).sqrt() - 1.0;
                let logit = -d * rx.min(ry) * 4.0;
                (255.0 / (1.0 + (-logit).exp())).round() as u8
            })
            .collect()
    }

    #[test]
    fn realistic_masks_of_a_12_mp_photo_store_in_well_under_2_mb() {
        // Ten instances of mixed sizes, as a real SAM3 gives for wall, floor and sofa in a room shot. The bundled
        // random-weights model instead makes soft noise everywhere (48x48 masks, no 0 and no 255 inside a box):
        // orchestrator-bench's 14.5 MB per 12 MP photo measures that model, not what a real one stores.
        let (w, h) = (4032u32, 3024u32);
        let blobs = [
            (144.0, 70.0, 140.0, 70.0),
            (144.0, 240.0, 140.0, 45.0),
            (150.0, 190.0, 70.0, 35.0),
            (60.0, 150.0, 25.0, 40.0),
            (230.0, 150.0, 25.0, 40.0),
            (100.0, 120.0, 10.0, 12.0),
            (190.0, 110.0, 15.0, 8.0),
            (40.0, 60.0, 20.0, 20.0),
            (260.0, 250.0, 18.0, 10.0),
            (200.0, 200.0, 30.0, 12.0),
        ];
        let mut total = 0;
        for (cx, cy, rx, ry) in blobs {
            let probs = saturated_blob(cx, cy, rx, ry);
            let model = ModelMask {
                width: 288,
                height: 288,
                probs: &probs,
            };
            let (sx, sy) = (w as f32 / 288.0, h as f32 / 288.0);
            let bbox = PixelBox {
                x0: (cx - rx) * sx,
                y0: (cy - ry) * sy,
                x1: (cx + rx) * sx,
                y1: (cy + ry) * sy,
            };
            let stored = instance_mask(&model, bbox, (w, h), None, MaskLayout::Crop);
            total += stored.png.len();
        }
        println!("10 saturated instances at 12 MP: {total} bytes");
        assert!(total < 2 << 20, "{total} bytes");
    }
}

#[cfg(test)]
mod measure {
    use super::*;

    #[test]
    #[ignore = "a measurement: cargo test --release -p orchestrator-svc --lib encode_speed -- --ignored --nocapture"]
    fn encode_speed() {
        // Soft noise like the bundled random-weights model's 48x48 masks, in a box over most of a 12 MP frame: the
        // least compressible instance there is.
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let probs: Vec<u8> = (0..48 * 48)
            .map(|_| (255.0 / (1.0 + (-(next() * 3.0)).exp())).round() as u8)
            .collect();
        let model = ModelMask {
            width: 48,
            height: 48,
            probs: &probs,
        };
        let bbox = PixelBox {
            x0: 200.0,
            y0: 100.0,
            x1: 3900.0,
            y1: 2900.0,
        };
        for layout in [MaskLayout::Crop, MaskLayout::Full, MaskLayout::Grid] {
            let mut best = f64::MAX;
            let mut len = 0;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                len = instance_mask(&model, bbox, (4032, 3024), None, layout)
                    .png
                    .len();
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            println!(
                "a 3700x2800 soft instance of a 12 MP photo as {layout:?}: {best:.1} ms, {len} bytes"
            );
        }
    }
}
