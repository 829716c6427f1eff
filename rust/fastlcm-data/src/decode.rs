//! Image bytes → RGB u8 (like PIL's `convert("RGB")`, no EXIF rotation) → resize short side to R with
//! Pillow's antialiased bilinear convolution → crop R×R (random or center) → optional flip, and the final
//! normalize + layout change into a batch slot (`write_chw`).
//!
//! JPEG uses libjpeg-turbo (optionally decoding at a reduced DCT scale 1/2, 1/4, 1/8, see [`dct_factor`]), PNG
//! the `png` crate (8/16-bit, gray, palette, alpha), WebP `image-webp`. Only the crop window of the resized image is
//! computed.

use std::io::Cursor;
use std::sync::OnceLock;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::config::{Crop, DType};
use crate::rng::Rng;

/// PIL's `Image.MAX_IMAGE_PIXELS`: larger declared sizes are rejected before any pixel buffer is allocated.
pub const MAX_PIXELS: u64 = 89_478_485;

/// Per-image transform options.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    /// Output side R: the short side is resized to R, then an R×R crop is taken.
    pub resolution: u32,
    /// Random or center crop.
    pub crop: Crop,
    /// Flip horizontally with probability 1/2 (after the crop).
    pub random_flip: bool,
    /// JPEG only: decode at the smallest of 1/2, 1/4, 1/8 DCT scale whose exact scaled short side is still
    /// >= 1.25 R (see [`dct_factor`]); the resize then still downsamples, to the same size as the full path.
    pub dct_scaling: bool,
    /// Reject images with more pixels than this.
    pub max_pixels: u64,
}

/// Per-thread reusable buffers and decoder state.
#[derive(Default)]
pub struct Scratch {
    tj: Option<turbojpeg::Decompressor>,
    rgb: Vec<u8>,
    tmp: Vec<u8>,
    resizer: Resizer,
}

impl Scratch {
    /// The RGB buffer of the last `decode_rgb` call.
    pub fn rgb_mut(&mut self) -> &mut Vec<u8> {
        &mut self.rgb
    }
}

/// Where the crop came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub orig_h: u32,
    pub orig_w: u32,
    pub top: u32,
    pub left: u32,
    pub flipped: bool,
}

/// Size after resizing the short side to `r` (torchvision: long = int(r * long / short)).
pub fn resized_size(w: u32, h: u32, r: u32) -> (u32, u32) {
    if w <= h {
        (r, ((r as f64 * h as f64 / w as f64) as u32).max(r))
    } else {
        (((r as f64 * w as f64 / h as f64) as u32).max(r), r)
    }
}

fn check_size(w: u64, h: u64, max_pixels: u64) -> Result<(), String> {
    if w == 0 || h == 0 {
        return Err(format!("image has zero size {w}x{h}"));
    }
    if w * h > max_pixels {
        return Err(format!(
            "declared size {w}x{h} exceeds the {max_pixels}-pixel limit"
        ));
    }
    Ok(())
}

/// Decodes to packed RGB u8 in `s.rgb`; returns (width, height, original width, original height).
/// With `dct_target = Some(R)`, a JPEG may be decoded at a reduced scale whose short side stays >= R.
pub fn decode_rgb(
    data: &[u8],
    s: &mut Scratch,
    dct_target: Option<u32>,
    max_pixels: u64,
) -> Result<(u32, u32, u32, u32), String> {
    if data.is_empty() {
        return Err("empty image member (0 bytes)".into());
    }
    if data.starts_with(&[0xff, 0xd8, 0xff]) {
        let r = decode_jpeg(data, s, dct_target, max_pixels);
        if r.is_err() {
            s.tj = None; // a fresh libjpeg-turbo handle after any failure
        }
        r
    } else if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        let (w, h) = decode_png(data, s, max_pixels)?;
        Ok((w, h, w, h))
    } else if data.len() >= 12 && &data[0..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        let (w, h) = decode_webp(data, s, max_pixels)?;
        Ok((w, h, w, h))
    } else {
        let head: Vec<String> = data.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(format!(
            "not a JPEG, PNG or WebP image (first bytes {})",
            head.join(" ")
        ))
    }
}

fn decode_jpeg(
    data: &[u8],
    s: &mut Scratch,
    dct_target: Option<u32>,
    max_pixels: u64,
) -> Result<(u32, u32, u32, u32), String> {
    if s.tj.is_none() {
        s.tj =
            Some(turbojpeg::Decompressor::new().map_err(|e| format!("libjpeg-turbo init: {e}"))?);
    }
    let tj = s.tj.as_mut().expect("decompressor");
    let header = tj
        .read_header(data)
        .map_err(|e| format!("JPEG header: {e}"))?;
    let (ow, oh) = (header.width as u64, header.height as u64);
    check_size(ow, oh, max_pixels)?;
    let factor = match (dct_target, header.is_lossless) {
        (Some(r), false) => dct_factor(ow.min(oh), r as u64),
        _ => turbojpeg::ScalingFactor::ONE,
    };
    tj.set_scaling_factor(factor)
        .map_err(|e| format!("JPEG scaling: {e}"))?;
    let scaled = header.scaled(factor);
    let (w, h) = (scaled.width, scaled.height);
    let cmyk = matches!(
        header.colorspace,
        turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
    );
    let (format, channels, buf) = if cmyk {
        (turbojpeg::PixelFormat::CMYK, 4, &mut s.tmp)
    } else {
        (turbojpeg::PixelFormat::RGB, 3, &mut s.rgb)
    };
    buf.resize(w * h * channels, 0);
    let image = turbojpeg::Image {
        pixels: buf.as_mut_slice(),
        width: w,
        pitch: w * channels,
        height: h,
        format,
    };
    tj.decompress(data, image)
        .map_err(|e| format!("JPEG data: {e}"))?;
    if cmyk {
        cmyk_to_rgb(&s.tmp, &mut s.rgb);
    }
    Ok((w as u32, h as u32, ow as u32, oh as u32))
}

/// The reduced DCT scales worth decoding at: 1/2, 1/4, 1/8 (those of `tj3GetScalingFactors` that are powers of
/// two), smallest first. libjpeg-turbo has SIMD inverse DCTs only for these (and 8/8); its 3/8, 5/8, 6/8 and 7/8
/// decodes use plain C IDCTs and are *slower* than a full decode (measured on the 512-1024 px benchmark shards,
/// CPU ms/image relative to 8/8: 1/8 0.65, 2/8 0.8, 3/8 0.9-1.3, 4/8 0.88, 5/8 1.15-1.8, 6/8 1.2-1.7,
/// 7/8 1.45-1.6; `cargo run --release --example timing`), so they are never chosen.
fn downscale_factors() -> &'static [turbojpeg::ScalingFactor] {
    static F: OnceLock<Vec<turbojpeg::ScalingFactor>> = OnceLock::new();
    F.get_or_init(|| {
        let supported = turbojpeg::Decompressor::supported_scaling_factors();
        [8, 4, 2]
            .into_iter()
            .map(|d| turbojpeg::ScalingFactor::new(1, d))
            .filter(|f| supported.contains(f))
            .collect()
    })
}

/// The smallest of 1/8, 1/4, 1/2 (see [`downscale_factors`]) with `short * f >= 1.25 * r` exactly (not after
/// libjpeg's rounding up); 1 when none fits. So both scaled sides stay above the torchvision resized size of the
/// original (the resize never upsamples) and the antialiased bilinear resize still does the last >= 1.25x of
/// the downscale: a DCT-domain downscale straight to the target size is sharper than Pillow's bilinear filter
/// (up to ~2 levels mean abs error, ~37 dB on noisy images), with the margin it stays within ~0.8 levels, > 46 dB.
/// E.g. r = 512: short >= 5120 → 1/8, >= 2560 → 1/4, >= 1280 → 1/2, below 1280 → 1 (full decode).
pub fn dct_factor(short: u64, r: u64) -> turbojpeg::ScalingFactor {
    downscale_factors()
        .iter()
        .copied()
        .find(|f| 4 * short * f.num() as u64 >= 5 * r * f.denom() as u64)
        .unwrap_or(turbojpeg::ScalingFactor::ONE)
}

fn muldiv255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// Adobe (inverted) CMYK as libjpeg returns it → RGB with Pillow's formula r = (255-k) - c(255-k)/255.
fn cmyk_to_rgb(cmyk: &[u8], rgb: &mut Vec<u8>) {
    rgb.clear();
    rgb.reserve(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        let nk = p[3] as u32; // inverted k = 255 - k
        for &c in &p[..3] {
            let c = 255 - c as u32;
            rgb.push((nk - muldiv255(c, nk)) as u8);
        }
    }
}

fn decode_png(data: &[u8], s: &mut Scratch, max_pixels: u64) -> Result<(u32, u32), String> {
    let mut dec = png::Decoder::new(Cursor::new(data));
    dec.set_transformations(png::Transformations::EXPAND);
    dec.set_limits(png::Limits {
        bytes: (max_pixels as usize).saturating_mul(8),
    });
    let mut reader = dec.read_info().map_err(|e| format!("PNG: {e}"))?;
    let (w, h) = (reader.info().width, reader.info().height);
    check_size(w as u64, h as u64, max_pixels)?;
    let (ct, depth) = reader.output_color_type();
    let size = reader
        .output_buffer_size()
        .ok_or("PNG: output buffer size overflows")?;
    s.tmp.resize(size, 0);
    let info = reader
        .next_frame(&mut s.tmp)
        .map_err(|e| format!("PNG: {e}"))?;
    let line = info.line_size;
    let n = (w * h) as usize;
    s.rgb.clear();
    s.rgb.reserve(n * 3);
    let sixteen = depth == png::BitDepth::Sixteen;
    let bps = if sixteen { 2 } else { 1 };
    let channels = match ct {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("PNG: palette not expanded".into()),
    };
    for row in s.tmp.chunks(line).take(h as usize) {
        for px in row.chunks_exact(channels * bps).take(w as usize) {
            // 16-bit samples: PIL keeps the high byte, except 16-bit gray ("I;16") whose values clip to 255.
            let v = |i: usize| if sixteen { px[2 * i] } else { px[i] };
            match channels {
                1 if sixteen => {
                    let g = u16::from_be_bytes([px[0], px[1]]).min(255) as u8;
                    s.rgb.extend_from_slice(&[g, g, g]);
                }
                1 | 2 => {
                    let g = v(0);
                    s.rgb.extend_from_slice(&[g, g, g]);
                }
                _ => s.rgb.extend_from_slice(&[v(0), v(1), v(2)]),
            }
        }
    }
    if s.rgb.len() != n * 3 {
        return Err("PNG: short image data".into());
    }
    Ok((w, h))
}

fn decode_webp(data: &[u8], s: &mut Scratch, max_pixels: u64) -> Result<(u32, u32), String> {
    let mut d =
        image_webp::WebPDecoder::new(Cursor::new(data)).map_err(|e| format!("WebP: {e}"))?;
    let (w, h) = d.dimensions();
    check_size(w as u64, h as u64, max_pixels)?;
    let size = d
        .output_buffer_size()
        .ok_or("WebP: output buffer size overflows")?;
    if d.has_alpha() {
        s.tmp.resize(size, 0);
        d.read_image(&mut s.tmp).map_err(|e| format!("WebP: {e}"))?;
        s.rgb.clear();
        s.rgb
            .extend(s.tmp.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]));
    } else {
        s.rgb.resize(size, 0);
        d.read_image(&mut s.rgb).map_err(|e| format!("WebP: {e}"))?;
    }
    Ok((w, h))
}

/// Full per-image transform: decode, resize, crop (coordinates drawn from `rng` in the order top, left, flip),
/// flip. `out` receives R×R×3 packed RGB u8.
pub fn process(
    data: &[u8],
    rng: &mut Rng,
    o: &DecodeOptions,
    s: &mut Scratch,
    out: &mut Vec<u8>,
) -> Result<Placement, String> {
    let r = o.resolution;
    let (w, h, ow, oh) = decode_rgb(data, s, o.dct_scaling.then_some(r), o.max_pixels)?;
    let (nw, nh) = resized_size(ow, oh, r);
    let (top, left) = if o.crop == Crop::Center {
        ((nh - r) / 2, (nw - r) / 2)
    } else {
        let t = rng.up_to((nh - r) as u64) as u32;
        (t, rng.up_to((nw - r) as u64) as u32)
    };
    let flipped = o.random_flip && (rng.next_u64() >> 63) == 1;
    out.resize((r * r * 3) as usize, 0);
    resize_crop(&s.rgb, w, h, nw, nh, top, left, r, &mut s.resizer, out)?;
    if flipped {
        for row in out.chunks_exact_mut((r * 3) as usize) {
            let n = r as usize;
            for x in 0..n / 2 {
                let (a, b) = (3 * x, 3 * (n - 1 - x));
                for c in 0..3 {
                    row.swap(a + c, b + c);
                }
            }
        }
    }
    Ok(Placement {
        orig_h: oh,
        orig_w: ow,
        top,
        left,
        flipped,
    })
}

/// Writes the R×R window at (top, left) of `rgb` (w×h) resized to (nw, nh) into `out` (R×R×3).
#[allow(clippy::too_many_arguments)]
pub fn resize_crop(
    rgb: &[u8],
    w: u32,
    h: u32,
    nw: u32,
    nh: u32,
    top: u32,
    left: u32,
    r: u32,
    resizer: &mut Resizer,
    out: &mut [u8],
) -> Result<(), String> {
    if (w, h) == (nw, nh) {
        let (rs, ws) = ((r * 3) as usize, (w * 3) as usize);
        for y in 0..r as usize {
            let src = (top as usize + y) * ws + left as usize * 3;
            out[y * rs..(y + 1) * rs].copy_from_slice(&rgb[src..src + rs]);
        }
        return Ok(());
    }
    let src =
        ImageRef::new(w, h, rgb, PixelType::U8x3).map_err(|e| format!("resize source: {e}"))?;
    let mut dst = Image::from_slice_u8(r, r, out, PixelType::U8x3)
        .map_err(|e| format!("resize target: {e}"))?;
    let (sx, sy) = (w as f64 / nw as f64, h as f64 / nh as f64);
    let (x0, y0) = (left as f64 * sx, top as f64 * sy);
    let cw = (r as f64 * sx).min(w as f64 - x0);
    let ch = (r as f64 * sy).min(h as f64 - y0);
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(x0, y0, cw, ch);
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| format!("resize: {e}"))
}

struct Luts {
    f32: [f32; 256],
    bf16: [u16; 256],
    f16: [u16; 256],
}

fn luts() -> &'static Luts {
    static L: OnceLock<Luts> = OnceLock::new();
    L.get_or_init(|| {
        // Same f32 arithmetic as torchvision's ToTensor + Normalize(0.5, 0.5): (v / 255 - 0.5) / 0.5.
        let f: [f32; 256] = std::array::from_fn(|v| (v as f32 / 255.0 - 0.5) / 0.5);
        Luts {
            f32: f,
            bf16: std::array::from_fn(|v| half::bf16::from_f32(f[v]).to_bits()),
            f16: std::array::from_fn(|v| half::f16::from_f32(f[v]).to_bits()),
        }
    })
}

/// Packed RGB u8 (R×R×3) → one CHW slot of `dtype` (normalized to [-1, 1] except uint8), native endian.
pub fn write_chw(src: &[u8], dtype: DType, dst: &mut [u8]) {
    let n = src.len() / 3;
    assert_eq!(dst.len(), n * 3 * dtype.size(), "slot size");
    let l = luts();
    match dtype {
        DType::U8 => planes(src, dst, |v| v),
        DType::F32 => match typed_mut::<f32>(dst) {
            Some(d) => planes(src, d, |v| l.f32[v as usize]),
            None => planes_bytes(src, dst, |v| l.f32[v as usize].to_ne_bytes()),
        },
        DType::BF16 | DType::F16 => {
            let t = if dtype == DType::BF16 {
                &l.bf16
            } else {
                &l.f16
            };
            match typed_mut::<u16>(dst) {
                Some(d) => planes(src, d, |v| t[v as usize]),
                None => planes_bytes(src, dst, |v| t[v as usize].to_ne_bytes()),
            }
        }
    }
}

/// Marker for element types that every bit pattern is a valid value of.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for u16 {}

/// Views an aligned byte slice as `T`s (None if misaligned).
fn typed_mut<T: Plain>(b: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: T is f32 or u16 (the `Plain` impls), for which every bit pattern is valid; `align_to_mut` only
    // returns a middle part that is correctly aligned and in bounds, and we use it only when nothing is left over.
    let (pre, mid, post) = unsafe { b.align_to_mut::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

fn planes<T: Copy>(src: &[u8], dst: &mut [T], f: impl Fn(u8) -> T) {
    let n = src.len() / 3;
    let (p0, rest) = dst.split_at_mut(n);
    let (p1, p2) = rest.split_at_mut(n);
    for ((((px, a), b), c), _) in src
        .chunks_exact(3)
        .zip(p0.iter_mut())
        .zip(p1.iter_mut())
        .zip(p2.iter_mut())
        .zip(0..n)
    {
        *a = f(px[0]);
        *b = f(px[1]);
        *c = f(px[2]);
    }
}

fn planes_bytes<const K: usize>(src: &[u8], dst: &mut [u8], f: impl Fn(u8) -> [u8; K]) {
    let n = src.len() / 3;
    let (p0, rest) = dst.split_at_mut(n * K);
    let (p1, p2) = rest.split_at_mut(n * K);
    for (((px, a), b), c) in src
        .chunks_exact(3)
        .zip(p0.chunks_exact_mut(K))
        .zip(p1.chunks_exact_mut(K))
        .zip(p2.chunks_exact_mut(K))
    {
        a.copy_from_slice(&f(px[0]));
        b.copy_from_slice(&f(px[1]));
        c.copy_from_slice(&f(px[2]));
    }
}

#[cfg(test)]
#[path = "decode_tests.rs"]
pub(crate) mod tests;
