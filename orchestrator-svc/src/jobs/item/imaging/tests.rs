use super::*;

#[test]
fn a_swatch_is_kept_at_most_max_swatch_side_long() {
    let png = |w: u32, h: u32| {
        let img = RgbImage::from_pixel(w, h, image::Rgb([120, 80, 40]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let big = decode_swatch(&png(MAX_SWATCH_SIDE * 2, 100), 50_000_000).unwrap();
    assert_eq!(big.dimensions(), (MAX_SWATCH_SIDE, 50));
    assert_eq!(big.get_pixel(10, 10).0, [120, 80, 40]);
    let small = decode_swatch(&png(300, 200), 50_000_000).unwrap();
    assert_eq!(small.dimensions(), (300, 200));
}

#[test]
fn a_swatch_over_max_swatch_pixels_is_refused_before_its_decode() {
    let (w, h) = (MAX_SWATCH_SIDE + 1, MAX_SWATCH_SIDE);
    let img = image::GrayImage::from_pixel(w, h, image::Luma([128]));
    let mut png = Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let err = decode_swatch(png.get_ref(), 50_000_000).unwrap_err();
    assert!(matches!(err, ItemError::InputTooLarge(_)), "{err:?}");
    let square = image::GrayImage::from_pixel(MAX_SWATCH_SIDE, h, image::Luma([128]));
    let mut png = Cursor::new(Vec::new());
    square.write_to(&mut png, image::ImageFormat::Png).unwrap();
    assert!(decode_swatch(png.get_ref(), 50_000_000).is_ok());
}

#[test]
fn a_16_bit_png_within_the_pixel_limit_decodes() {
    // 2900 x 2900 x 8 bytes is over 64 MB and over 4 bytes for each of 10 M pixels: refused before.
    let (w, h) = (2900, 2900);
    let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
        w,
        h,
        image::Rgba([40_000, 20_000, 10_000, 65_535]),
    );
    let mut png = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgba16(img)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let rgb = decode_upright(png.get_ref(), 10_000_000).unwrap();
    assert_eq!(rgb.dimensions(), (w, h));
    assert_eq!(rgb.get_pixel(7, 7).0, [156, 78, 39]);
}

#[test]
fn pixel_limit_is_checked_before_decoding() {
    let img = RgbImage::from_pixel(40, 30, image::Rgb([10, 20, 30]));
    let jpeg = encode_jpeg(&img).unwrap();
    assert!(matches!(
        decode_upright(&jpeg, 1000),
        Err(ItemError::InputTooLarge(_))
    ));
    let back = decode_upright(&jpeg, 1200).unwrap();
    assert_eq!(back.dimensions(), (40, 30));
}

/// The pixel budget's admission reads the header's size and refuses one over the limits there, not after waiting
/// for its pixels (all of the budget, for a size over it).
#[test]
fn a_size_over_the_limits_is_refused_before_admission() {
    let img = RgbImage::from_pixel(40, 30, image::Rgb([10, 20, 30]));
    let jpeg = encode_jpeg(&img).unwrap();
    assert!(matches!(
        admissible_pixels(&jpeg, 1000),
        Err(ItemError::InputTooLarge(_))
    ));
    assert_eq!(admissible_pixels(&jpeg, 1200).unwrap(), 1200);
    // No header to read: admitted for nothing, and decoding says why.
    assert_eq!(admissible_pixels(b"not an image", 1200).unwrap(), 0);
}

#[test]
fn a_cut_off_jpeg_is_corrupt_not_a_photo_with_a_grey_band() {
    let img = RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let jpeg = encode_jpeg(&img).unwrap();
    assert!(decode_upright(&jpeg, 1 << 20).is_ok());
    let cut = &jpeg[..jpeg.len() * 7 / 10];
    match decode_upright(cut, 1 << 20) {
        Err(ItemError::InputCorrupt(msg)) => assert!(msg.contains("truncated"), "{msg}"),
        other => panic!("{:?}", other.map(|i| i.dimensions())),
    }
}

#[test]
fn a_heic_photo_is_refused_by_its_format_name() {
    let mut heic = vec![0, 0, 0, 24];
    heic.extend_from_slice(b"ftypheic\0\0\0\0mif1heic");
    heic.extend_from_slice(&[0u8; 64]);
    match decode_upright(&heic, 1 << 20) {
        Err(ItemError::InputCorrupt(msg)) => {
            assert!(
                msg.contains("HEIC") && msg.contains("JPEG, PNG or WebP"),
                "{msg}"
            )
        }
        other => panic!("{:?}", other.map(|i| i.dimensions())),
    }
}

#[test]
fn a_transparent_background_reads_as_white_not_black() {
    // A product cut-out: transparent pixels stored as (0, 0, 0, 0), as most encoders write them.
    let rgba = RgbaImage::from_fn(20, 10, |x, _| {
        if x < 10 {
            image::Rgba([0, 0, 0, 0])
        } else {
            image::Rgba([30, 60, 200, 255])
        }
    });
    let mut png = Cursor::new(Vec::new());
    DynamicImage::ImageRgba8(rgba)
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let rgb = decode_upright(png.get_ref(), 1 << 20).unwrap();
    assert_eq!(rgb.get_pixel(2, 5).0, [255, 255, 255]);
    assert_eq!(rgb.get_pixel(15, 5).0, [30, 60, 200]);
}

#[test]
fn a_photos_transparency_is_kept_only_when_it_has_some() {
    let png = |rgba: RgbaImage| {
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgba8(rgba)
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    let cut_out = png(RgbaImage::from_fn(20, 10, |x, _| {
        image::Rgba([30, 60, 200, (x * 12) as u8])
    }));
    let (rgb, alpha) = decode_photo(&cut_out, 1 << 20).unwrap();
    let alpha = alpha.expect("a transparent PNG keeps its alpha");
    assert_eq!(alpha.dimensions(), rgb.dimensions());
    assert_eq!(alpha.get_pixel(5, 3).0, [60]);
    // The RGB is still the photo on white, as the segmenter reads it.
    assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
    // An alpha channel of 255s (most exported PNGs) costs nothing.
    let opaque = png(RgbaImage::from_pixel(20, 10, image::Rgba([1, 2, 3, 255])));
    assert!(decode_photo(&opaque, 1 << 20).unwrap().1.is_none());
}

/// Rows built as they are encoded give the pixels the whole-image way gave (an RGBA copy of the photo, its
/// transparency kept, encoded by the image crate), on noise and every level of alpha.
#[test]
fn a_transparent_png_output_built_by_rows_has_the_pixels_of_the_whole_image_way() {
    let (w, h) = (300, 200);
    let mut seed = 1u32;
    let mut noise = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed as u8
    };
    let rgb = RgbImage::from_fn(w, h, |_, _| image::Rgb([noise(), noise(), noise()]));
    // Opaque, transparent and every level between.
    let alpha = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([match x % 3 {
            0 => 255,
            1 => 0,
            _ => ((x + y) % 256) as u8,
        }])
    });
    let mut whole = RgbaImage::from_fn(w, h, |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        image::Rgba([r, g, b, 255])
    });
    palette_rules::ops::remove::keep_source_transparency(&mut whole, &alpha);
    let by_rows = encode_png_keeping(&rgb, Some(&alpha)).unwrap();
    let decoded = image::load_from_memory(&by_rows).unwrap();
    assert_eq!(decoded.color(), image::ColorType::Rgba8);
    assert!(decoded.into_rgba8() == whole, "pixels differ");
}

#[test]
fn a_png_output_keeps_the_photos_transparency_and_an_opaque_one_is_plain_rgb() {
    let source = RgbaImage::from_fn(20, 10, |x, _| image::Rgba([30, 60, 200, (x * 12) as u8]));
    let mut png = Cursor::new(Vec::new());
    DynamicImage::ImageRgba8(source.clone())
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let (rgb, alpha) = decode_photo(png.get_ref(), 1 << 20).unwrap();
    let kept = image::load_from_memory(&encode_png_keeping(&rgb, alpha.as_ref()).unwrap()).unwrap();
    assert_eq!(kept.color(), image::ColorType::Rgba8);
    let kept = kept.into_rgba8();
    for x in 0..20 {
        let [r, g, b, a] = kept.get_pixel(x, 5).0;
        assert_eq!(a, (x * 12) as u8, "the photo's own alpha");
        if a >= 48 {
            // Taken back off the white (8-bit rounding on the way).
            for (got, want) in [r, g, b].into_iter().zip([30u8, 60, 200]) {
                assert!(got.abs_diff(want) <= 3, "x {x}: {got} for {want}");
            }
        }
    }
    let opaque = RgbImage::from_pixel(8, 4, image::Rgb([1, 2, 3]));
    let plain = image::load_from_memory(&encode_png_keeping(&opaque, None).unwrap()).unwrap();
    assert_eq!(plain.color(), image::ColorType::Rgb8);
    assert_eq!(plain.into_rgb8(), opaque);
}

#[test]
fn garbage_is_corrupt() {
    assert!(matches!(
        decode_upright(b"not an image", 1000),
        Err(ItemError::InputCorrupt(_))
    ));
}

#[test]
fn sides_beyond_jpegs_limit_are_refused_as_too_large() {
    // A 70000x1 strip is few pixels but cannot be written back as a JPEG.
    let mut png = Vec::new();
    png_encoder(&mut png, CompressionType::Fast)
        .write_image(
            &vec![0u8; 70_000 * 3],
            70_000,
            1,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    match decode_upright(&png, 1 << 30) {
        Err(ItemError::InputTooLarge(msg)) => assert!(msg.contains("65535"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

fn jpeg_with_profile(img: &RgbImage, icc: Vec<u8>) -> Vec<u8> {
    use image::codecs::jpeg::JpegEncoder;
    let mut out = Vec::new();
    let mut encoder = JpegEncoder::new_with_quality(&mut out, 100);
    encoder.set_icc_profile(icc).unwrap();
    encoder
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

#[test]
fn an_embedded_display_p3_profile_is_converted_to_srgb() {
    // A phone's P3 orange: the same numbers in sRGB are a duller colour, so the decoded pixels must move.
    let img = RgbImage::from_pixel(32, 16, image::Rgb([220, 120, 40]));
    let plain = decode_upright(&encode_jpeg(&img).unwrap(), 1 << 20).unwrap();
    let icc = moxcms::ColorProfile::new_display_p3().encode().unwrap();
    let tagged = decode_upright(&jpeg_with_profile(&img, icc), 1 << 20).unwrap();
    let [r0, g0, b0] = plain.get_pixel(8, 8).0;
    let [r, g, b] = tagged.get_pixel(8, 8).0;
    // Display P3 (220, 120, 40) is sRGB (235, 113, 0) by the book (blue clipped): redder, less blue.
    assert!(
        r > r0 + 10 && b + 15 < b0,
        "{:?} -> {:?}",
        [r0, g0, b0],
        [r, g, b]
    );
    let srgb = moxcms::ColorProfile::new_srgb().encode().unwrap();
    let tagged_srgb = decode_upright(&jpeg_with_profile(&img, srgb), 1 << 20).unwrap();
    let plain_100 = decode_upright(&jpeg_with_profile(&img, Vec::new()), 1 << 20).unwrap();
    assert_eq!(tagged_srgb, plain_100, "an sRGB profile changes nothing");
}

/// `jpeg` with an EXIF block saying `orientation` in IFD0 and an Exif sub-IFD whose next-IFD offset is not 0, as
/// some phones and cameras write it (a strict EXIF parser refuses the whole block for it).
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&2u16.to_be_bytes());
    tiff.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1]);
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&[0x87, 0x69, 0, 4, 0, 0, 0, 1]);
    tiff.extend_from_slice(&38u32.to_be_bytes());
    tiff.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(tiff.len(), 38);
    tiff.extend_from_slice(&1u16.to_be_bytes());
    tiff.extend_from_slice(&[0x90, 0x00, 0, 7, 0, 0, 0, 4]);
    tiff.extend_from_slice(b"0230");
    tiff.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut app1 = vec![0xFF, 0xE1];
    app1.extend_from_slice(&(2 + 6 + tiff.len() as u16).to_be_bytes());
    app1.extend_from_slice(b"Exif\0\0");
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn orientation_is_read_as_the_segmenter_reads_it_despite_a_flawed_exif_block() {
    let img = RgbImage::from_fn(40, 20, |x, _| {
        image::Rgb([if x < 20 { 250 } else { 10 }, 0, 0])
    });
    let jpeg = with_exif_orientation(&encode_jpeg(&img).unwrap(), 6);
    let upright = decode_upright(&jpeg, 1 << 20).unwrap();
    assert_eq!(
        upright.dimensions(),
        (20, 40),
        "rotated 90 degrees clockwise"
    );
    // The left half (red) is now the top.
    assert!(upright.get_pixel(10, 5).0[0] > 200 && upright.get_pixel(10, 35).0[0] < 60);
    // The segmenter's reading of the same bytes (the image crate's), which must agree.
    let mut decoder = ImageReader::new(Cursor::new(&jpeg[..]))
        .with_guessed_format()
        .unwrap()
        .into_decoder()
        .unwrap();
    assert_eq!(
        decoder.orientation().unwrap(),
        image::metadata::Orientation::Rotate90
    );
}

#[test]
fn preview_fits_256() {
    let img = RgbImage::new(1000, 500);
    let jpeg = preview_jpeg(&img).unwrap();
    let back = image::load_from_memory(&jpeg).unwrap();
    assert_eq!((back.width(), back.height()), (256, 128));
}

#[test]
fn preview_looks_like_the_photo_scaled_down() {
    // Against image's area-averaging thumbnail (what made previews before): a photo with smooth gradients and a
    // hard edge must come out within a code or two on average, and the edge where it was.
    let img = RgbImage::from_fn(1008, 756, |x, y| {
        let edge = if x * 3 > y * 4 + 300 { 180 } else { 30 };
        image::Rgb([(x / 4) as u8, (y / 3) as u8, edge])
    });
    let preview = image::load_from_memory(&preview_jpeg(&img).unwrap())
        .unwrap()
        .to_rgb8();
    let reference = image::imageops::thumbnail(&img, 256, 192);
    assert_eq!(preview.dimensions(), reference.dimensions());
    let diff: u64 = preview
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| u64::from(a.abs_diff(*b)))
        .sum();
    let mean = diff as f64 / preview.as_raw().len() as f64;
    assert!(mean < 2.0, "mean |diff| {mean:.2} codes");
}

#[test]
#[ignore = "a measurement: cargo test --release -p orchestrator-svc --lib preview_downscale -- --ignored --nocapture"]
fn preview_downscale_against_thumbnail() {
    for (w, h) in [(1008u32, 756u32), (4032, 3024)] {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
        let best = |f: &dyn Fn() -> RgbImage| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(f());
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::MAX, f64::min)
        };
        let (tw, th) = (256, 192);
        let thumb = best(&|| image::imageops::thumbnail(&img, tw, th));
        let fir = best(&|| crate::resize::downscale_rgb(&img, (tw, th)));
        println!("{w}x{h} -> {tw}x{th}: thumbnail {thumb:.2} ms, fast_image_resize {fir:.2} ms");
    }
}
