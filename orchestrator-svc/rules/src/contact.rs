//! Before/after contact sheets: people judge edits faster by looking than by reading numbers.

use image::{DynamicImage, Rgb, RgbImage, imageops};

const GAP: u32 = 8;
const LABEL_H: u32 = 20;
const TEXT_SCALE: u32 = 2;

/// 5x7 glyphs for the two labels we draw (rows top to bottom, 5 bits, MSB = left column).
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        'A' => [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'B' => [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e],
        'E' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f],
        'F' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10],
        'O' => [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'R' => [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11],
        'T' => [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        _ => return None,
    })
}

fn draw_text(img: &mut RgbImage, x0: u32, y0: u32, text: &str) {
    let mut x = x0;
    for c in text.chars() {
        if let Some(g) = glyph(c.to_ascii_uppercase()) {
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5u32 {
                    if bits & (0x10 >> col) != 0 {
                        for dy in 0..TEXT_SCALE {
                            for dx in 0..TEXT_SCALE {
                                let (px, py) =
                                    (x + col * TEXT_SCALE + dx, y0 + row as u32 * TEXT_SCALE + dy);
                                if px < img.width() && py < img.height() {
                                    img.put_pixel(px, py, Rgb([240, 240, 240]));
                                }
                            }
                        }
                    }
                }
            }
        }
        x += 6 * TEXT_SCALE;
    }
}

/// Flattens any image for display; transparency shows as a grey checkerboard.
pub fn flatten(img: &DynamicImage) -> RgbImage {
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let bg = if ((x / 12) + (y / 12)) % 2 == 0 {
            200.0
        } else {
            150.0
        };
        let a = p[3] as f32 / 255.0;
        Rgb(std::array::from_fn(|k| {
            (p[k] as f32 * a + bg * (1.0 - a) + 0.5) as u8
        }))
    })
}

/// One row per pair, "before" left and "after" right, each scaled to `cell_h` pixels high and labelled.
pub fn contact_sheet(pairs: &[(RgbImage, RgbImage)], cell_h: u32) -> RgbImage {
    let scaled: Vec<(RgbImage, RgbImage)> = pairs
        .iter()
        .map(|(a, b)| {
            let fit = |i: &RgbImage| {
                let w = ((i.width() as f32 * cell_h as f32 / i.height().max(1) as f32).round()
                    as u32)
                    .max(1);
                imageops::resize(i, w, cell_h, imageops::FilterType::Triangle)
            };
            (fit(a), fit(b))
        })
        .collect();
    let width = scaled
        .iter()
        .map(|(a, b)| a.width() + b.width() + 3 * GAP)
        .max()
        .unwrap_or(1);
    let height = GAP + scaled.len() as u32 * (LABEL_H + cell_h + GAP);
    let mut sheet = RgbImage::from_pixel(width, height, Rgb([32, 32, 36]));
    for (i, (a, b)) in scaled.iter().enumerate() {
        let y = GAP + i as u32 * (LABEL_H + cell_h + GAP);
        draw_text(&mut sheet, GAP, y + 3, "before");
        draw_text(&mut sheet, 2 * GAP + a.width(), y + 3, "after");
        imageops::replace(&mut sheet, a, GAP as i64, (y + LABEL_H) as i64);
        imageops::replace(
            &mut sheet,
            b,
            (2 * GAP + a.width()) as i64,
            (y + LABEL_H) as i64,
        );
    }
    sheet
}
