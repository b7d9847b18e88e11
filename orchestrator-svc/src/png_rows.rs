//! PNGs written a row at a time, by hand around fdeflate: every row Paeth-filtered by a loop that vectorises and the
//! rows compressed as one stream. Instance masks (8-bit grayscale, `mask_png`, where the reasons are measured) and
//! photos' PNG outputs (8-bit RGB, or RGBA for a transparent photo: `jobs::item::imaging`). The png crate's encoder, whose adaptive
//! filter tries all five filters a byte at a time, took a third longer on the masks; and its whole-image API needed
//! an RGBA copy of a transparent photo per output, its row-by-row one copied each row twice more.

/// The pixels of a PNG written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pixels {
    /// 8-bit grayscale: one byte per pixel.
    Gray8,
    /// 8-bit RGB: three bytes per pixel.
    Rgb8,
    /// 8-bit RGBA, not premultiplied: four bytes per pixel.
    Rgba8,
}

impl Pixels {
    fn bytes(self) -> usize {
        match self {
            Pixels::Gray8 => 1,
            Pixels::Rgb8 => 3,
            Pixels::Rgba8 => 4,
        }
    }

    /// IHDR's colour type.
    fn colour_type(self) -> u8 {
        match self {
            Pixels::Gray8 => 0,
            Pixels::Rgb8 => 2,
            Pixels::Rgba8 => 6,
        }
    }
}

/// A `width` x `height` PNG of `pixels` with `chunks` (type, data) before its image data; `row(r, out)` fills image
/// row r (from 0), `width` pixels of `pixels`.
pub fn encode(
    (width, height): (u32, u32),
    pixels: Pixels,
    chunks: &[(&[u8; 4], &[u8])],
    mut row: impl FnMut(u32, &mut [u8]),
) -> Vec<u8> {
    let bpp = pixels.bytes();
    let line = width as usize * bpp;
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = [0u8; 13];
    ihdr[..4].copy_from_slice(&width.to_be_bytes());
    ihdr[4..8].copy_from_slice(&height.to_be_bytes());
    // Bit depth 8, the colour type, deflate, adaptive filtering (per-row filter types), no interlace.
    ihdr[8] = 8;
    ihdr[9] = pixels.colour_type();
    write_chunk(&mut out, b"IHDR", &ihdr);
    for (kind, data) in chunks {
        write_chunk(&mut out, kind, data);
    }

    let mut deflate = fdeflate::Compressor::new(Vec::with_capacity(line * height as usize / 4))
        .expect("a Vec takes every write");
    // Row buffers with one pixel of zeros first: the pixel left of column 0 (and above-left) is 0 for Paeth.
    let (mut prev, mut cur) = (vec![0u8; line + bpp], vec![0u8; line + bpp]);
    let mut filtered = vec![0u8; line + 1];
    filtered[0] = PAETH;
    for y in 0..height {
        row(y, &mut cur[bpp..]);
        paeth_row(&cur, &prev, bpp, &mut filtered[1..]);
        deflate
            .write_data(&filtered)
            .expect("a Vec takes every write");
        std::mem::swap(&mut prev, &mut cur);
    }
    let stream = deflate.finish().expect("a Vec takes every write");
    // Chunk lengths stop at 2^31 - 1: large streams take several IDAT chunks (decoders join them).
    out.reserve(stream.len() + 32);
    for part in stream.chunks(IDAT_MAX) {
        write_chunk(&mut out, b"IDAT", part);
    }
    write_chunk(&mut out, b"IEND", &[]);
    out
}

/// PNG filter type 4.
const PAETH: u8 = 4;
/// Largest IDAT chunk written: any size below 2^31 does; one chunk holds a 12 MP soft mask's few MB.
const IDAT_MAX: usize = 256 << 20;

/// One chunk: length, type, data, CRC of type and data.
fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// The Paeth filter of one row of `bpp`-byte pixels (PNG spec, 9.4): `cur` and `prev` hold the row and the row
/// above after one pixel of zeros (the pixel left of column 0), `out` gets one residual per byte. Each byte is
/// predicted from the same byte of the neighbouring pixels, all unfiltered, so nothing carries from one byte to the
/// next: branch-free over i16 the loop vectorises; same tie-breaking as the spec (a, then b, then c).
fn paeth_row(cur: &[u8], prev: &[u8], bpp: usize, out: &mut [u8]) {
    let n = out.len();
    let (left, x) = (&cur[..n], &cur[bpp..bpp + n]);
    let (up_left, up) = (&prev[..n], &prev[bpp..bpp + n]);
    for i in 0..n {
        let (a, b, c) = (i16::from(left[i]), i16::from(up[i]), i16::from(up_left[i]));
        let pa = (b - c).abs();
        let pb = (a - c).abs();
        let pc = (a + b - 2 * c).abs();
        let b_or_c = if pb <= pc { b } else { c };
        let pred = if pa <= pb && pa <= pc { a } else { b_or_c };
        out[i] = x[i].wrapping_sub(pred as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paeth_matches_the_specs_predictor() {
        // PNG spec 9.4, written as there.
        fn predictor(a: u8, b: u8, c: u8) -> u8 {
            let p = i16::from(a) + i16::from(b) - i16::from(c);
            let (pa, pb, pc) = (
                (p - i16::from(a)).abs(),
                (p - i16::from(b)).abs(),
                (p - i16::from(c)).abs(),
            );
            if pa <= pb && pa <= pc {
                a
            } else if pb <= pc {
                b
            } else {
                c
            }
        }
        let values = [0u8, 1, 2, 127, 128, 200, 254, 255];
        for &a in &values {
            for &b in &values {
                for &c in &values {
                    for &x in &values {
                        let mut out = [0u8];
                        paeth_row(&[a, x], &[c, b], 1, &mut out);
                        assert_eq!(
                            out[0],
                            x.wrapping_sub(predictor(a, b, c)),
                            "{a} {b} {c} {x}"
                        );
                    }
                }
            }
        }
    }

    /// An RGBA image written here reads back as it was written (each channel predicted from its own channel).
    #[test]
    fn an_rgba_png_reads_back_as_written() {
        let (w, h) = (37u32, 11u32);
        let px = |x: u32, y: u32| [(x * 7) as u8, (y * 23) as u8, (x ^ y) as u8, (x * y) as u8];
        let png = encode((w, h), Pixels::Rgba8, &[], |y, out| {
            for (x, p) in out.chunks_exact_mut(4).enumerate() {
                p.copy_from_slice(&px(x as u32, y));
            }
        });
        let back = image::load_from_memory(&png).unwrap();
        assert_eq!(back.color(), image::ColorType::Rgba8);
        assert_eq!(
            back.into_rgba8(),
            image::RgbaImage::from_fn(w, h, |x, y| image::Rgba(px(x, y)))
        );
    }
}
