use super::*;
use crate::mask_png::{Placement, nonzero_bounds};

fn entry(width: u32, height: u32) -> StoredMask {
    StoredMask {
        concept: "wall".into(),
        instance: 1,
        key: "masks/u/j/wall/0_1.png".into(),
        score: 0.9,
        x: 0,
        y: 0,
        width: 1,
        height: 1,
        image_width: width,
        image_height: height,
        grid_width: 0,
        grid_height: 0,
    }
}

/// `entry` as the job records a mask stored at `at`.
fn placed(entry: StoredMask, at: Placement) -> StoredMask {
    StoredMask {
        x: at.x,
        y: at.y,
        width: at.width,
        height: at.height,
        ..entry
    }
}

#[test]
fn crops_fold_back_into_the_union_the_job_built() {
    let (w, h) = (20, 10);
    let mut a = GrayImage::new(w, h);
    let mut b = GrayImage::new(w, h);
    for x in 2..8 {
        a.put_pixel(x, 3, image::Luma([200]));
    }
    for y in 1..9 {
        b.put_pixel(6, y, image::Luma([250]));
        b.put_pixel(15, y, image::Luma([40]));
    }
    let crop = |m: &GrayImage| {
        let at = nonzero_bounds(m).unwrap_or(Placement::EMPTY);
        (placed(entry(w, h), at), mask_png::encode_crop(m, at))
    };
    let mut union = UnionPlane::new(w, h);
    for (entry, png) in [crop(&a), crop(&b)] {
        paste_max(&mut union, &entry, &png, (w, h)).unwrap();
    }
    let union = union.into_image();
    let expected = GrayImage::from_fn(w, h, |x, y| {
        image::Luma([a.get_pixel(x, y)[0].max(b.get_pixel(x, y)[0])])
    });
    assert!(union == expected);
}

#[test]
fn every_layout_folds_back_into_the_union_the_job_built() {
    use crate::config::MaskLayout;
    use crate::jobs::item::instance_masks::instance_mask;
    use palette_rules::mask::{ModelMask, PixelBox};
    let (w, h) = (301u32, 203u32);
    let probs: Vec<u8> = (0..12 * 9u32)
        .map(|k| ((k * 37) % 256) as u8 & if k % 5 == 0 { 0 } else { 255 })
        .collect();
    let model = ModelMask {
        width: 12,
        height: 9,
        probs: &probs,
    };
    let boxes = [(10.0, 20.0, 150.0, 120.0), (120.0, 60.0, 290.0, 200.0)];
    for layout in [MaskLayout::Grid, MaskLayout::Crop, MaskLayout::Full] {
        let (mut job_union, mut edit_union) = (UnionPlane::new(w, h), UnionPlane::new(w, h));
        for (x0, y0, x1, y1) in boxes {
            let bbox = PixelBox { x0, y0, x1, y1 };
            let stored = instance_mask(&model, bbox, (w, h), Some(&mut job_union), layout);
            let entry = StoredMask {
                grid_width: stored.grid.0,
                grid_height: stored.grid.1,
                ..placed(entry(w, h), stored.placement)
            };
            let png = image::load_from_memory(&stored.png).unwrap();
            let size = match layout {
                MaskLayout::Grid => (12, 9),
                MaskLayout::Crop => (stored.placement.width, stored.placement.height),
                MaskLayout::Full => (w, h),
            };
            assert_eq!((png.width(), png.height()), size, "{layout:?}");
            paste_max(&mut edit_union, &entry, &stored.png, (w, h)).unwrap();
        }
        assert!(
            job_union.into_image() == edit_union.into_image(),
            "{layout:?}"
        );
    }
}

/// A record and a PNG of different runs (the job id run again with another MASK_LAYOUT): a grid PNG under a
/// crop entry was pasted raw at (0, 0), the wrong region painted; now the item fails naming the mask.
#[test]
fn a_png_of_another_layout_than_its_record_is_refused() {
    use crate::config::MaskLayout;
    use crate::jobs::item::instance_masks::instance_mask;
    use palette_rules::mask::{ModelMask, PixelBox};
    let (w, h) = (301u32, 203u32);
    let probs = vec![255u8; 12 * 9];
    let model = ModelMask {
        width: 12,
        height: 9,
        probs: &probs,
    };
    let bbox = PixelBox {
        x0: 10.0,
        y0: 20.0,
        x1: 150.0,
        y1: 120.0,
    };
    let grid = instance_mask(&model, bbox, (w, h), None, MaskLayout::Grid);
    let crop = instance_mask(&model, bbox, (w, h), None, MaskLayout::Crop);
    let grid_entry = StoredMask {
        grid_width: grid.grid.0,
        grid_height: grid.grid.1,
        ..entry(w, h)
    };
    let mut union = UnionPlane::new(w, h);
    for (entry, png, says) in [
        (entry(w, h), &grid.png, "another run"),
        (grid_entry, &crop.png, "placement chunk"),
    ] {
        let err = paste_max(&mut union, &entry, png, (w, h)).unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
    }
}

/// A PNG of the record's own layout but another run's (the job id run again on the same photo: its record not yet
/// rewritten, or its item failed after storing some masks): its placement is not the record's, and the union would
/// have mixed two runs' masks; the item fails naming the mask.
#[test]
fn a_png_of_another_run_in_the_same_layout_is_refused() {
    use crate::config::MaskLayout;
    use crate::jobs::item::instance_masks::instance_mask;
    use palette_rules::mask::{ModelMask, PixelBox};
    let (w, h) = (301u32, 203u32);
    // Two runs' masks of one instance: the later one's left third is empty (a model updated since).
    let earlier = vec![255u8; 12 * 9];
    let later: Vec<u8> = (0..12 * 9)
        .map(|k| if k % 12 < 4 { 0 } else { 255 })
        .collect();
    let model = |probs| ModelMask {
        width: 12,
        height: 9,
        probs,
    };
    let bbox = PixelBox {
        x0: 10.0,
        y0: 20.0,
        x1: 150.0,
        y1: 120.0,
    };
    for layout in [MaskLayout::Grid, MaskLayout::Crop] {
        let recorded = instance_mask(&model(&earlier), bbox, (w, h), None, layout);
        let stored_again = instance_mask(&model(&later), bbox, (w, h), None, layout);
        assert_ne!(recorded.placement, stored_again.placement);
        let entry = StoredMask {
            grid_width: recorded.grid.0,
            grid_height: recorded.grid.1,
            ..placed(entry(w, h), recorded.placement)
        };
        let mut union = UnionPlane::new(w, h);
        paste_max(&mut union, &entry, &recorded.png, (w, h)).unwrap();
        let err = paste_max(&mut union, &entry, &stored_again.png, (w, h)).unwrap_err();
        assert!(err.to_string().contains("another run"), "{layout:?}: {err}");
    }
}

#[test]
fn a_record_naming_another_jobs_masks_is_not_read() {
    let record = |key: &str| MasksRecord {
        masks: vec![StoredMask {
            key: key.into(),
            ..entry(20, 10)
        }],
        input_sha256: String::new(),
        concepts: Vec::new(),
    };
    assert!(foreign_mask(&record("masks/u/j/wall/0_1.png"), "u", "j").is_none());
    for foreign in [
        "masks/other-user/j/wall/0_1.png",
        "masks/u/j2/wall/0_1.png",
        "outputs/u/j/rule1/0.jpg",
        "masks/u/j/../../v/k/wall/0_1.png",
    ] {
        assert!(
            foreign_mask(&record(foreign), "u", "j").is_some(),
            "{foreign}"
        );
    }
}

#[test]
fn a_mask_larger_than_the_photo_is_refused_before_it_is_decoded() {
    let wide = GrayImage::from_pixel(64, 8, image::Luma([255]));
    let png = mask_png::encode_crop(&wide, nonzero_bounds(&wide).unwrap());
    let mut union = UnionPlane::new(20, 10);
    let err = paste_max(&mut union, &entry(20, 10), &png, (20, 10)).unwrap_err();
    assert_eq!(err.code(), "mask_missing");
    assert!(
        crate::error::report(&err).contains("at most 20x10"),
        "{err}"
    );
}

#[test]
fn a_mask_stored_for_another_photo_size_is_refused_naming_its_key() {
    let png = mask_png::encode_crop(&GrayImage::new(4, 4), Placement::EMPTY);
    let mut union = UnionPlane::new(20, 10);
    let err = paste_max(&mut union, &entry(40, 30), &png, (20, 10)).unwrap_err();
    assert_eq!(err.code(), "mask_missing");
    assert!(err.to_string().contains("masks/u/j/wall/0_1.png"), "{err}");
}
