use super::*;

fn pattern(w: u32, h: u32, f: impl Fn(u32, u32, u32) -> u32) -> Vec<u8> {
    let mut v = Vec::new();
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                v.push((f(x, y, c) % 256) as u8);
            }
        }
    }
    v
}

fn png_bytes(
    w: u32,
    h: u32,
    ct: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
    palette: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(ct);
        e.set_depth(depth);
        if let Some(p) = palette {
            e.set_palette(p.to_vec());
        }
        let mut wr = e.write_header().unwrap();
        wr.write_image_data(data).unwrap();
    }
    out
}

fn opts(r: u32) -> DecodeOptions {
    DecodeOptions {
        resolution: r,
        crop: Crop::Center,
        random_flip: false,
        dct_scaling: false,
        max_pixels: MAX_PIXELS,
    }
}

#[test]
fn resized_size_follows_torchvision() {
    assert_eq!(resized_size(768, 1024, 512), (512, 682));
    assert_eq!(resized_size(1000, 600, 512), (853, 512));
    assert_eq!(resized_size(100, 100, 512), (512, 512));
}

#[test]
fn resize_matches_pillow_golden() {
    // Golden values: PIL 13 `Image.fromarray(a).resize((3, 2), Image.BILINEAR)` on the 6x4 pattern below.
    let src = pattern(6, 4, |x, y, c| x * 37 + y * 11 + c * 50);
    let golden = [
        34u8, 84, 134, 101, 151, 183, 167, 201, 94, 51, 101, 151, 118, 168, 186, 184, 140, 64,
    ];
    let mut out = vec![0u8; 2 * 2 * 3];
    let mut rz = Resizer::new();
    // Full 3x2 output, checked as two 2x2 crops (left 0 and 1).
    for left in 0..2u32 {
        resize_crop(&src, 6, 4, 3, 2, 0, left, 2, &mut rz, &mut out).unwrap();
        for y in 0..2usize {
            for x in 0..2usize {
                for c in 0..3usize {
                    let g = golden[(y * 3 + x + left as usize) * 3 + c] as i32;
                    let v = out[(y * 2 + x) * 3 + c] as i32;
                    assert!(
                        (g - v).abs() <= 1,
                        "left {left} y {y} x {x} c {c}: {v} vs {g}"
                    );
                }
            }
        }
    }
    // 13x9 → 5x3 (PIL golden), crops of width 3 at every offset.
    let src = pattern(13, 9, |x, y, c| x * 29 + y * 53 + c * 71);
    let golden: [u8; 45] = [
        97, 142, 156, 150, 138, 105, 134, 108, 124, 90, 125, 159, 127, 149, 110, 132, 102, 129,
        116, 127, 142, 130, 150, 123, 144, 107, 122, 128, 112, 141, 133, 153, 96, 156, 121, 105,
        104, 118, 142, 110, 153, 120, 144, 145, 100,
    ];
    let mut out = vec![0u8; 27];
    let mut exact = 0;
    for left in 0..3u32 {
        resize_crop(&src, 13, 9, 5, 3, 0, left, 3, &mut rz, &mut out).unwrap();
        for y in 0..3usize {
            for x in 0..3usize {
                for c in 0..3usize {
                    let g = golden[(y * 5 + x + left as usize) * 3 + c] as i32;
                    let v = out[(y * 3 + x) * 3 + c] as i32;
                    assert!(
                        (g - v).abs() <= 1,
                        "left {left} y {y} x {x} c {c}: {v} vs {g}"
                    );
                    exact += (g == v) as usize;
                }
            }
        }
    }
    assert!(exact >= 50, "most values bit-exact ({exact}/81)");
}

#[test]
fn png_modes_convert_like_pil() {
    let mut s = Scratch::default();
    // 16-bit gray clips to 255 (PIL "I;16" → RGB); 8-bit gray replicates.
    let g16: Vec<u8> = [0u16, 200, 256, 40000]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let p = png_bytes(
        2,
        2,
        png::ColorType::Grayscale,
        png::BitDepth::Sixteen,
        &g16,
        None,
    );
    assert_eq!(
        decode_rgb(&p, &mut s, None, MAX_PIXELS).unwrap(),
        (2, 2, 2, 2)
    );
    assert_eq!(
        s.rgb,
        vec![0, 0, 0, 200, 200, 200, 255, 255, 255, 255, 255, 255]
    );
    // 16-bit RGB keeps the high byte.
    let rgb16: Vec<u8> = [0x1234u16, 0xff00, 0x00ff]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let p = png_bytes(
        1,
        1,
        png::ColorType::Rgb,
        png::BitDepth::Sixteen,
        &rgb16,
        None,
    );
    decode_rgb(&p, &mut s, None, MAX_PIXELS).unwrap();
    assert_eq!(s.rgb, vec![0x12, 0xff, 0x00]);
    // Palette expands; gray+alpha and RGBA drop alpha.
    let p = png_bytes(
        2,
        1,
        png::ColorType::Indexed,
        png::BitDepth::Eight,
        &[1, 0],
        Some(&[1, 2, 3, 4, 5, 6]),
    );
    decode_rgb(&p, &mut s, None, MAX_PIXELS).unwrap();
    assert_eq!(s.rgb, vec![4, 5, 6, 1, 2, 3]);
    let p = png_bytes(
        1,
        1,
        png::ColorType::GrayscaleAlpha,
        png::BitDepth::Eight,
        &[9, 0],
        None,
    );
    decode_rgb(&p, &mut s, None, MAX_PIXELS).unwrap();
    assert_eq!(s.rgb, vec![9, 9, 9]);
    let p = png_bytes(
        1,
        1,
        png::ColorType::Rgba,
        png::BitDepth::Eight,
        &[7, 8, 9, 0],
        None,
    );
    decode_rgb(&p, &mut s, None, MAX_PIXELS).unwrap();
    assert_eq!(s.rgb, vec![7, 8, 9]);
}

#[test]
fn huge_declared_size_is_rejected_before_allocation() {
    let mut p = png_bytes(
        1,
        1,
        png::ColorType::Rgb,
        png::BitDepth::Eight,
        &[1, 2, 3],
        None,
    );
    // Patch IHDR width/height to 60000x60000 (the CRC is then wrong too; either check must fail cleanly).
    p[16..20].copy_from_slice(&60000u32.to_be_bytes());
    p[20..24].copy_from_slice(&60000u32.to_be_bytes());
    let mut s = Scratch::default();
    assert!(decode_rgb(&p, &mut s, None, MAX_PIXELS).is_err());
    assert!(s.rgb.capacity() < 1 << 20);
    assert!(decode_rgb(b"", &mut s, None, MAX_PIXELS)
        .unwrap_err()
        .contains("0 bytes"));
    assert!(decode_rgb(b"GIF89a....", &mut s, None, MAX_PIXELS)
        .unwrap_err()
        .contains("not a JPEG"));
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let px = pattern(w, h, |x, y, c| (x / 4) * 9 + (y / 4) * 5 + c * 60);
    encode_rgb_jpeg(&px, w, h, 95, turbojpeg::Subsamp::None)
}

/// JPEG bytes of packed RGB pixels (`w * h * 3`), for the tests of this crate.
pub(crate) fn encode_rgb_jpeg(
    px: &[u8],
    w: u32,
    h: u32,
    quality: i32,
    subsamp: turbojpeg::Subsamp,
) -> Vec<u8> {
    let img = turbojpeg::Image {
        pixels: px,
        width: w as usize,
        pitch: w as usize * 3,
        height: h as usize,
        format: turbojpeg::PixelFormat::RGB,
    };
    turbojpeg::compress(img, quality, subsamp).unwrap().to_vec()
}

#[test]
fn jpeg_decodes_and_dct_scaling_stays_close() {
    let data = jpeg(200, 160);
    let mut s = Scratch::default();
    assert_eq!(
        decode_rgb(&data, &mut s, None, MAX_PIXELS).unwrap(),
        (200, 160, 200, 160)
    );
    assert_eq!(
        decode_rgb(&data, &mut s, Some(32), MAX_PIXELS).unwrap(),
        (50, 40, 200, 160),
        "1/4: 40 >= 1.25 * 32"
    );
    assert_eq!(
        decode_rgb(&data, &mut s, Some(64), MAX_PIXELS).unwrap(),
        (100, 80, 200, 160),
        "1/2: 80 = 1.25 * 64 exactly"
    );
    assert_eq!(
        decode_rgb(&data, &mut s, Some(65), MAX_PIXELS).unwrap().0,
        200,
        "no scaling when short < 2.5 R"
    );
    let mut rng = Rng::new(0);
    let (mut full, mut scaled) = (Vec::new(), Vec::new());
    let p1 = process(&data, &mut rng, &opts(40), &mut s, &mut full).unwrap();
    let p2 = process(
        &data,
        &mut rng,
        &DecodeOptions {
            dct_scaling: true,
            ..opts(40)
        },
        &mut s,
        &mut scaled,
    )
    .unwrap();
    assert_eq!(p1, p2, "same placement and original size");
    let mad: f64 = full
        .iter()
        .zip(&scaled)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / full.len() as f64;
    assert!(mad < 6.0, "mean abs diff {mad}");
}

#[test]
fn dct_factor_is_smallest_power_of_two_keeping_margin() {
    let f = |short, r| {
        let f = dct_factor(short, r);
        (f.num(), f.denom())
    };
    assert_eq!(
        f(768, 512),
        (1, 1),
        "6/8 would fit but decodes slower than 8/8"
    );
    assert_eq!(
        f(1024, 512),
        (1, 1),
        "1/2 would land exactly on R: no bilinear step left"
    );
    assert_eq!(f(1279, 512), (1, 1));
    assert_eq!(f(1280, 512), (1, 2), "1280 / 2 = 640 = 1.25 * 512");
    assert_eq!(f(2559, 512), (1, 2));
    assert_eq!(f(2560, 512), (1, 4));
    assert_eq!(f(5120, 512), (1, 8));
    assert_eq!(f(100_000, 512), (1, 8), "1/8 is the smallest");
    assert_eq!(f(512, 512), (1, 1));
    assert_eq!(f(300, 512), (1, 1), "never upsample");
    for short in 1..7000u64 {
        for r in [64u64, 256, 512, 1024] {
            let fac = dct_factor(short, r);
            let (n, d) = (fac.num() as u64, fac.denom() as u64);
            assert!(n == 1 && [1, 2, 4, 8].contains(&d), "{n}/{d}");
            // Exact scaled short side >= 1.25 R (so >= R even after rounding), and the next power is too small.
            assert!(
                d == 1 || 4 * short >= 5 * r * d,
                "short {short} r {r}: 1/{d} too small"
            );
            assert!(
                d == 8 || 4 * short < 5 * r * d * 2,
                "short {short} r {r}: 1/{} would fit",
                d * 2
            );
        }
    }
}

#[test]
fn dct_scaled_process_keeps_full_decode_geometry() {
    // 901x701 at R=280: 1/2 (701 / 2 = 350.5 >= 1.25 * 280) → libjpeg rounds up to 451x351, which is then
    // resized to the full path's int(280 * 901 / 701) = 359 x 280.
    let data = jpeg(901, 701);
    let mut s = Scratch::default();
    assert_eq!(
        decode_rgb(&data, &mut s, Some(280), MAX_PIXELS).unwrap(),
        (451, 351, 901, 701)
    );
    for crop in [Crop::Center, Crop::Random] {
        let o = DecodeOptions { crop, ..opts(280) };
        let (mut full, mut scaled) = (Vec::new(), Vec::new());
        let p1 = process(&data, &mut Rng::new(7), &o, &mut s, &mut full).unwrap();
        let p2 = process(
            &data,
            &mut Rng::new(7),
            &DecodeOptions {
                dct_scaling: true,
                ..o.clone()
            },
            &mut s,
            &mut scaled,
        )
        .unwrap();
        assert_eq!(p1, p2, "same placement and original size");
        assert_eq!(full.len(), scaled.len());
        let mad = full
            .iter()
            .zip(&scaled)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / full.len() as f64;
        // The pattern has hard mod-256 wrap edges (worst case for any rescale); the tight quality bound on
        // photo-like images is in tests/test_loader_dct.py.
        assert!(mad < 6.0, "crop {crop:?}: mean abs diff {mad}");
    }
}

#[test]
fn crop_is_inside_and_flip_mirrors() {
    let data = jpeg(90, 60);
    let mut s = Scratch::default();
    let o = DecodeOptions {
        crop: Crop::Random,
        random_flip: true,
        ..opts(32)
    };
    let mut seen_flip = [false, false];
    for seed in 0..40 {
        let mut out = Vec::new();
        let p = process(&data, &mut Rng::new(seed), &o, &mut s, &mut out).unwrap();
        assert_eq!((p.orig_h, p.orig_w), (60, 90));
        assert!(p.top == 0 && p.left <= 48 - 32, "{p:?}");
        seen_flip[p.flipped as usize] = true;
        let mut plain = Vec::new();
        let q = process(
            &data,
            &mut Rng::new(seed),
            &DecodeOptions {
                random_flip: false,
                ..o.clone()
            },
            &mut s,
            &mut plain,
        )
        .unwrap();
        assert_eq!((q.top, q.left), (p.top, p.left));
        if p.flipped {
            assert_eq!(&out[0..3], &plain[31 * 3..32 * 3]);
        } else {
            assert_eq!(out, plain);
        }
    }
    assert!(seen_flip[0] && seen_flip[1]);
}

#[test]
fn chw_normalization_per_dtype() {
    let src = [0u8, 128, 255, 10, 20, 30];
    let mut f = vec![0u8; 6 * 4];
    write_chw(&src, DType::F32, &mut f);
    let v: Vec<f32> = f
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(v[0], -1.0);
    assert_eq!(v[1], (10.0f32 / 255.0 - 0.5) / 0.5);
    assert!((v[1] - (10.0 / 127.5 - 1.0)).abs() < 1e-6);
    assert_eq!(v[2], (128.0f32 / 255.0 - 0.5) / 0.5);
    assert_eq!(v[4], 1.0);
    let mut u = vec![0u8; 6];
    write_chw(&src, DType::U8, &mut u);
    assert_eq!(u, vec![0, 10, 128, 20, 255, 30]);
    let mut b = vec![0u8; 12];
    write_chw(&src, DType::BF16, &mut b);
    assert_eq!(
        u16::from_ne_bytes([b[8], b[9]]),
        half::bf16::from_f32(1.0).to_bits()
    );
    write_chw(&src, DType::F16, &mut b);
    assert_eq!(
        u16::from_ne_bytes([b[0], b[1]]),
        half::f16::from_f32(-1.0).to_bits()
    );
}

#[test]
fn chw_write_handles_misaligned_slots() {
    let src = [0u8, 128, 255, 10, 20, 30];
    let mut aligned = [0u8; 6 * 4 + 1];
    write_chw(&src, DType::F32, &mut aligned[..24]);
    let expect = aligned[..24].to_vec();
    // Same bytes through the byte-wise path (slot starting at an odd address).
    let mut other = [0u8; 25];
    let off = if (other.as_ptr() as usize).is_multiple_of(4) {
        1
    } else {
        0
    };
    write_chw(&src, DType::F32, &mut other[off..off + 24]);
    assert_eq!(&other[off..off + 24], expect.as_slice());
}
