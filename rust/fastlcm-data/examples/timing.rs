//! Quick per-stage timing on one shard: `cargo run --release --example timing -- SHARD.tar [R]`.
//! Prints images/s for JPEG decode alone, and for decode + resize + crop (+ CHW float32 write).

use std::time::Instant;

/// CPU time of this thread in seconds (Linux schedstat), so numbers hold on a busy machine.
fn cpu_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|ns| ns * 1e-9)
        .unwrap_or(f64::NAN)
}

use fastlcm_data::config::{Crop, DType};
use fastlcm_data::decode::{decode_rgb, process, write_chw, DecodeOptions, Scratch, MAX_PIXELS};
use fastlcm_data::rng::Rng;
use fastlcm_data::samples::{select, Filters, Grouper};
use fastlcm_data::tar::TarReader;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: timing SHARD.tar [R]");
    let r: u32 = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(512);
    let mut tar = TarReader::new(std::fs::File::open(path).unwrap(), path.as_str());
    let mut g = Grouper::default();
    let shard: std::sync::Arc<str> = std::sync::Arc::from(path.as_str());
    let mut images = Vec::new();
    let mut groups = Vec::new();
    while let Some(e) = tar.next_entry().unwrap() {
        groups.extend(g.push(e));
    }
    groups.extend(g.finish());
    for gr in groups {
        if let Ok(s) = select(gr, &shard, &Filters::default()) {
            images.push(s.image);
        }
    }
    let mut s = Scratch::default();
    let (t, c) = (Instant::now(), cpu_s());
    for im in &images {
        decode_rgb(im, &mut s, None, MAX_PIXELS).unwrap();
    }
    let (dec, cpu) = (t.elapsed().as_secs_f64(), cpu_s() - c);
    println!(
        "decode only: {:.1} img/s wall, {:.1} img per CPU-second ({} images)",
        images.len() as f64 / dec,
        images.len() as f64 / cpu,
        images.len()
    );
    let c = cpu_s();
    for im in &images {
        decode_rgb(im, &mut s, Some(r), MAX_PIXELS).unwrap();
    }
    println!(
        "decode only at the dct_scaling factor for R={r}: {:.2} ms CPU/image",
        (cpu_s() - c) * 1000.0 / images.len() as f64
    );
    for fast in [false, true] {
        let mut tj = turbojpeg::Decompressor::new().unwrap();
        tj.set_fast_upsample(fast).unwrap();
        let mut buf = Vec::new();
        let c = cpu_s();
        for im in &images {
            let h = tj.read_header(im).unwrap();
            let f = fastlcm_data::decode::dct_factor(h.width.min(h.height) as u64, r as u64);
            decode_scaled(&mut tj, im, h, f, &mut buf);
        }
        println!(
            "  raw libjpeg-turbo at that factor, fast_upsample={fast}: {:.2} ms CPU/image",
            (cpu_s() - c) * 1000.0 / images.len() as f64
        );
    }
    // Raw decode cost of every eighth (on all images, whatever R): shows which factors pay off.
    let mut tj = turbojpeg::Decompressor::new().unwrap();
    let mut buf = Vec::new();
    for (m, fast) in (1..=8usize)
        .map(|m| (m, false))
        .chain([(4, true), (8, true)])
    {
        tj.set_fast_upsample(fast).unwrap();
        let f = turbojpeg::ScalingFactor::new(m, 8);
        let c = cpu_s();
        for im in &images {
            let h = tj.read_header(im).unwrap();
            decode_scaled(&mut tj, im, h, f, &mut buf);
        }
        println!(
            "  decode at {m}/8 (fast_upsample={fast}): {:.2} ms CPU/image",
            (cpu_s() - c) * 1000.0 / images.len() as f64
        );
    }
    {
        use fastlcm_data::decode::{resize_crop, resized_size};
        let (w, h, _, _) = decode_rgb(&images[0], &mut s, None, MAX_PIXELS).unwrap();
        let (nw, nh) = resized_size(w, h, r);
        let rgb = std::mem::take(s_rgb(&mut s));
        let mut out = vec![0u8; (r * r * 3) as usize];
        let mut rz = fast_image_resize::Resizer::new();
        let c = cpu_s();
        for _ in 0..50 {
            resize_crop(&rgb, w, h, nw, nh, 0, 0, r, &mut rz, &mut out).unwrap();
        }
        println!(
            "resize_crop {w}x{h}->{nw}x{nh}: {:.2} ms CPU",
            (cpu_s() - c) * 1000.0 / 50.0
        );
        let mut slot = vec![0u8; (3 * r * r * 4) as usize];
        let c = cpu_s();
        for _ in 0..50 {
            write_chw(&out, DType::F32, &mut slot);
        }
        println!("write_chw f32: {:.2} ms CPU", (cpu_s() - c) * 1000.0 / 50.0);
    }
    // Quality of reduced-scale decoding against the full decode (center crop), for decode targets m * R.
    if std::env::var_os("TIMING_QUALITY").is_some() {
        use fastlcm_data::decode::{resize_crop, resized_size};
        let mut rz = fast_image_resize::Resizer::new();
        for m in [1.0f64, 1.25, 1.5, 2.0] {
            for im in &images {
                let (w, h, ow, oh) = decode_rgb(im, &mut s, None, MAX_PIXELS).unwrap();
                let (nw, nh) = resized_size(ow, oh, r);
                let (top, left) = ((nh - r) / 2, (nw - r) / 2);
                let mut a = vec![0u8; (r * r * 3) as usize];
                let rgb = s.rgb_mut().clone();
                resize_crop(&rgb, w, h, nw, nh, top, left, r, &mut rz, &mut a).unwrap();
                let t = (r as f64 * m).ceil() as u32;
                let (w2, h2, _, _) = decode_rgb(im, &mut s, Some(t), MAX_PIXELS).unwrap();
                let mut b = a.clone();
                let rgb = s.rgb_mut().clone();
                resize_crop(&rgb, w2, h2, nw, nh, top, left, r, &mut rz, &mut b).unwrap();
                let n = a.len() as f64;
                let mae = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (*x as f64 - *y as f64).abs())
                    .sum::<f64>()
                    / n;
                let mse = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                    .sum::<f64>()
                    / n;
                println!(
                    "margin {m}: {ow}x{oh} decoded {w2}x{h2} -> {nw}x{nh}: MAE {mae:.3} PSNR {:.1}",
                    10.0 * (255.0f64 * 255.0 / mse).log10()
                );
            }
        }
    }
    for dct in [false, true] {
        let o = DecodeOptions {
            resolution: r,
            crop: Crop::Random,
            random_flip: false,
            dct_scaling: dct,
            max_pixels: MAX_PIXELS,
        };
        let mut out = Vec::new();
        let mut slot = vec![0u8; (3 * r * r * 4) as usize];
        let c = cpu_s();
        for (i, im) in images.iter().enumerate() {
            process(im, &mut Rng::new(i as u64), &o, &mut s, &mut out).unwrap();
            write_chw(&out, DType::F32, &mut slot);
        }
        let cpu = cpu_s() - c;
        println!(
            "decode+resize+crop+f32 (dct_scaling={dct}): {:.1} img per CPU-second ({:.2} ms/image)",
            images.len() as f64 / cpu,
            cpu * 1000.0 / images.len() as f64
        );
    }
}

/// Raw libjpeg-turbo decode of `jpeg` (whose header is `header`) to RGB at scaling factor `f`, into `buf`.
fn decode_scaled(
    tj: &mut turbojpeg::Decompressor,
    jpeg: &[u8],
    header: turbojpeg::DecompressHeader,
    f: turbojpeg::ScalingFactor,
    buf: &mut Vec<u8>,
) {
    tj.set_scaling_factor(f).unwrap();
    let sc = header.scaled(f);
    buf.resize(sc.width * sc.height * 3, 0);
    let img = turbojpeg::Image {
        pixels: buf.as_mut_slice(),
        width: sc.width,
        pitch: sc.width * 3,
        height: sc.height,
        format: turbojpeg::PixelFormat::RGB,
    };
    tj.decompress(jpeg, img).unwrap();
}

fn s_rgb(s: &mut Scratch) -> &mut Vec<u8> {
    s.rgb_mut()
}
