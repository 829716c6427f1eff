//! End-to-end tests of the loader on shards written to a temp dir.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;

use crate::config::{DType, LoaderConfig, OnError, ResumeState};
use crate::decode::tests::encode_rgb_jpeg;

use crate::pipeline::Loader;
use crate::safetensors::tests::file as safetensors_file;
use crate::tar::build::{tar, Long};
use crate::Error;

fn jpeg(w: u32, h: u32, v: u32) -> Vec<u8> {
    let mut px = Vec::new();
    for y in 0..h {
        for x in 0..w {
            px.extend_from_slice(&[
                (x * 3 + v * 17) as u8,
                (y * 5 + v * 31) as u8,
                (x ^ y ^ v) as u8,
            ]);
        }
    }
    encode_rgb_jpeg(&px, w, h, 90, turbojpeg::Subsamp::Sub2x2)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fastlcm-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `shards` shards of `per` samples each; sample i is `{i:05}` with a jpg, txt and json.
fn make_shards(name: &str, shards: usize, per: usize) -> (PathBuf, String) {
    make_shards_with(name, shards, per, false)
}

/// As `make_shards`; with `latents` each sample also has a `latent.safetensors` of i + 1 values.
fn make_shards_with(name: &str, shards: usize, per: usize, latents: bool) -> (PathBuf, String) {
    let d = tmpdir(name);
    for s in 0..shards {
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for j in 0..per {
            let i = s * per + j;
            let (w, h) = [(40, 30), (24, 36), (32, 32)][i % 3];
            files.push((format!("{i:05}.jpg"), jpeg(w, h, i as u32)));
            files.push((format!("{i:05}.txt"), format!("caption {i}").into_bytes()));
            files.push((
                format!("{i:05}.json"),
                format!("{{\"original_width\": {w}}}").into_bytes(),
            ));
            if latents {
                files.push((
                    format!("{i:05}.latent.safetensors"),
                    safetensors_file(i + 1, "{}"),
                ));
            }
        }
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        std::fs::write(d.join(format!("s-{s:03}.tar")), tar(&refs, Long::None)).unwrap();
    }
    let spec = format!("{}/s-{{000..{:03}}}.tar", d.display(), shards - 1);
    (d, spec)
}

fn cfg(spec: &str, b: usize) -> LoaderConfig {
    let mut c = LoaderConfig::new(vec![spec.to_string()], b);
    c.resolution = 16;
    c.dtype = DType::U8;
    c.shuffle_buffer = 5;
    c.seed = 3;
    c.random_flip = true;
    c
}

fn drain(l: &mut Loader) -> Vec<(Vec<String>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; l.batch_nbytes()];
    while let Some(m) = l.next_batch(&mut buf).unwrap() {
        out.push((m.keys, buf.clone()));
    }
    out
}

#[test]
fn same_batches_for_any_thread_count() {
    let (_d, spec) = make_shards("threads", 3, 7);
    let mut c = cfg(&spec, 4);
    c.epochs = Some(2);
    let one = drain(&mut Loader::new(c.clone()).unwrap());
    assert_eq!(one.len(), 2 * (21 / 4));
    for t in [2, 5] {
        let mut ct = c.clone();
        ct.threads = t;
        assert_eq!(drain(&mut Loader::new(ct).unwrap()), one, "threads={t}");
    }
    let mut keys: Vec<String> = one[..5].iter().flat_map(|b| b.0.clone()).collect();
    assert_ne!(
        keys,
        (0..20).map(|i| format!("{i:05}")).collect::<Vec<_>>(),
        "shuffled"
    );
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 20, "no duplicates within an epoch");
}

#[test]
fn resume_continues_with_the_next_batch() {
    let (_d, spec) = make_shards("resume", 3, 7);
    let mut c = cfg(&spec, 3);
    c.epochs = Some(2);
    c.threads = 2;
    let all = drain(&mut Loader::new(c.clone()).unwrap());
    for k in [1, 6, 7, all.len() - 1] {
        let mut l = Loader::new(c.clone()).unwrap();
        let mut buf = vec![0u8; l.batch_nbytes()];
        for _ in 0..k {
            l.next_batch(&mut buf).unwrap().unwrap();
        }
        let st: ResumeState = l.state().clone();
        let mut l2 = Loader::new(c.clone()).unwrap();
        l2.load_state(st).unwrap();
        let rest = drain(&mut l2);
        assert_eq!(rest, all[k..].to_vec(), "resume after {k} batches");
        assert_eq!(
            l2.stats().corrupt_image.load(Relaxed),
            0,
            "replay decodes nothing it discards"
        );
    }
}

#[test]
fn ranks_split_without_duplicates() {
    let (_d, spec) = make_shards("ranks", 5, 3);
    let mut seen = Vec::new();
    for rank in 0..2 {
        let mut c = cfg(&spec, 1);
        c.rank = rank;
        c.world_size = 2;
        seen.extend(
            drain(&mut Loader::new(c).unwrap())
                .into_iter()
                .flat_map(|b| b.0),
        );
    }
    seen.sort();
    assert_eq!(seen, (0..15).map(|i| format!("{i:05}")).collect::<Vec<_>>());
}

#[test]
fn corrupt_images_are_skipped_or_raised_with_context() {
    let d = tmpdir("corrupt");
    let good = jpeg(20, 20, 1);
    let t = tar(
        &[
            ("a.jpg", &good),
            ("a.txt", b"ok"),
            ("b.jpg", b"\xff\xd8\xffgarbage"),
            ("b.txt", b"bad"),
            ("c.txt", b"no image"),
            ("e.jpg", &good),
            ("e.txt", b"ok2"),
        ],
        Long::None,
    );
    let p = d.join("x.tar");
    std::fs::write(&p, t).unwrap();
    let spec = p.display().to_string();
    let mut c = cfg(&spec, 1);
    c.shuffle_buffer = 0;
    let mut l = Loader::new(c.clone()).unwrap();
    let keys: Vec<String> = drain(&mut l).into_iter().flat_map(|b| b.0).collect();
    assert_eq!(keys, vec!["a", "e"], "{}", l.stats().snapshot());
    assert_eq!(
        (
            l.stats().corrupt_image.load(Relaxed),
            l.stats().missing_image.load(Relaxed)
        ),
        (1, 1)
    );
    c.on_error = OnError::Raise;
    let mut l = Loader::new(c).unwrap();
    let mut buf = vec![0u8; l.batch_nbytes()];
    l.next_batch(&mut buf).unwrap().unwrap();
    let err = l.next_batch(&mut buf).unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("x.tar") && msg.contains("b.jpg"), "{msg}");
}

#[test]
fn no_data_and_truncation_never_spin() {
    let d = tmpdir("nodata");
    let mut c = cfg(&format!("{}/missing-{{0..2}}.tar", d.display()), 2);
    c.epochs = None;
    let err = Loader::new(c.clone())
        .unwrap()
        .next_batch(&mut vec![0u8; 2 * 3 * 256])
        .unwrap_err();
    assert!(matches!(err, Error::NoData(_)), "{err:?}");
    c.resampled = true;
    let err = Loader::new(c)
        .unwrap()
        .next_batch(&mut vec![0u8; 2 * 3 * 256])
        .unwrap_err();
    assert!(matches!(err, Error::NoData(_)), "{err:?}");

    let good = jpeg(20, 20, 1);
    let t = tar(
        &[
            ("a.jpg", &good),
            ("a.txt", b"x"),
            ("b.jpg", &good),
            ("b.txt", b"y"),
        ],
        Long::None,
    );
    // Cut inside b.txt's header: a complete, b loses its caption.
    std::fs::write(d.join("t.tar"), &t[..t.len() - 1024 - 512 - 300]).unwrap();
    let mut c = cfg(&format!("{}/t.tar", d.display()), 1);
    c.shuffle_buffer = 0;
    let mut l = Loader::new(c).unwrap();
    let keys: Vec<String> = drain(&mut l).into_iter().flat_map(|b| b.0).collect();
    assert_eq!(keys, vec!["a"]);
    assert_eq!(l.stats().truncated_tar.load(Relaxed), 1);
    assert_eq!(l.stats().missing_caption.load(Relaxed), 1);
}

#[test]
fn bad_arguments_are_rejected() {
    let (_d, spec) = make_shards("args", 1, 2);
    let mut c = cfg(&spec, 1);
    c.rank = 2;
    c.world_size = 2;
    assert!(
        matches!(Loader::new(c).err().unwrap(), Error::InvalidArgument(m) if m.contains("rank"))
    );
    let mut c = cfg(&spec, 1);
    c.world_size = 2;
    c.rank = 1;
    assert!(matches!(Loader::new(c).err().unwrap(), Error::NoData(m) if m.contains("world_size")));
}

#[test]
fn resume_rereads_only_shards_still_in_the_shuffle_buffer() {
    let (d, spec) = make_shards("resume-cheap", 6, 4);
    let mut c = cfg(&spec, 2);
    c.shuffle_buffer = 3;
    let all = drain(&mut Loader::new(c.clone()).unwrap());
    assert_eq!(all.len(), 12);
    let mut l = Loader::new(c.clone()).unwrap();
    let mut buf = vec![0u8; l.batch_nbytes()];
    for _ in 0..10 {
        l.next_batch(&mut buf).unwrap().unwrap();
    }
    let st = l.state().clone();
    assert!(st.shard_counts.len() >= 4, "{st:?}");
    assert!(st.shard_counts.iter().all(|&n| n == 4));
    let mut l2 = Loader::new(c.clone()).unwrap();
    l2.load_state(st.clone()).unwrap();
    assert_eq!(drain(&mut l2), all[10..].to_vec());
    let total: u64 = (0..6)
        .map(|s| {
            std::fs::metadata(d.join(format!("s-{s:03}.tar")))
                .unwrap()
                .len()
        })
        .sum();
    let read = l2.stats().bytes_read.load(Relaxed);
    assert!(read < total * 5 / 6, "resume read {read} of {total} bytes");
    // Without the counts the same state still resumes exactly (full replay of the epoch).
    let mut l3 = Loader::new(c).unwrap();
    l3.load_state(ResumeState {
        shard_counts: vec![],
        ..st
    })
    .unwrap();
    assert_eq!(drain(&mut l3), all[10..].to_vec());
}

#[test]
fn resampled_resume_is_exact() {
    let (_d, spec) = make_shards("resampled", 4, 3);
    let mut c = cfg(&spec, 2);
    c.resampled = true;
    c.shuffle_buffer = 4;
    let mut l = Loader::new(c.clone()).unwrap();
    let mut buf = vec![0u8; l.batch_nbytes()];
    let mut seq = Vec::new();
    let mut state_at_5 = None;
    for i in 0..12 {
        seq.push(l.next_batch(&mut buf).unwrap().unwrap().keys);
        if i == 4 {
            state_at_5 = Some(l.state().clone());
        }
    }
    let mut l2 = Loader::new(c).unwrap();
    l2.load_state(state_at_5.unwrap()).unwrap();
    for expect in &seq[5..] {
        assert_eq!(&l2.next_batch(&mut buf).unwrap().unwrap().keys, expect);
    }
}

fn raw_cfg(spec: &str, b: usize) -> LoaderConfig {
    let mut c = cfg(spec, b);
    c.raw = true;
    c
}

/// Keys and, per sample, the member extensions and the latent's byte length.
type RawBatch = (Vec<String>, Vec<(Vec<String>, usize)>);

fn drain_raw(l: &mut Loader) -> Vec<RawBatch> {
    let mut out = Vec::new();
    assert_eq!(l.batch_nbytes(), 0);
    while let Some(m) = l.next_batch(&mut []).unwrap() {
        let members = m
            .members
            .iter()
            .map(|ms| {
                let exts = ms.iter().map(|(e, _)| e.clone()).collect();
                let latent = ms.iter().find(|(e, _)| e == "latent.safetensors").unwrap();
                (exts, latent.1.len())
            })
            .collect();
        out.push((m.keys, members));
    }
    out
}

#[test]
fn raw_mode_keeps_the_image_mode_stream_and_yields_all_members() {
    let (_d, spec) = make_shards_with("raw-order", 3, 7, true);
    let mut c = cfg(&spec, 4);
    c.epochs = Some(2);
    let images: Vec<Vec<String>> = drain(&mut Loader::new(c.clone()).unwrap())
        .into_iter()
        .map(|b| b.0)
        .collect();
    c.raw = true;
    for t in [1, 3] {
        c.threads = t;
        let mut l = Loader::new(c.clone()).unwrap();
        let raw = drain_raw(&mut l);
        let keys: Vec<Vec<String>> = raw.iter().map(|b| b.0.clone()).collect();
        assert_eq!(
            keys, images,
            "same order, shuffle and batching as image mode (threads={t})"
        );
        let (exts, len) = &raw[0].1[0];
        assert_eq!(exts, &["jpg", "txt", "json", "latent.safetensors"]);
        let i: usize = raw[0].0[0].parse().unwrap();
        assert_eq!(*len, safetensors_file(i + 1, "{}").len());
        let snap = l.stats().snapshot();
        assert_eq!(snap["samples_yielded"], 2 * 20);
        assert_eq!(snap["skipped"]["partial_batch"], 2);
        assert!(
            snap["skipped"].get("corrupt_image").is_none()
                && snap["skipped"]["corrupt_latent"] == 0
        );
    }
}

#[test]
fn raw_mode_splits_ranks_and_resumes_exactly() {
    let (_d, spec) = make_shards_with("raw-resume", 5, 3, true);
    let mut seen = Vec::new();
    for rank in 0..2 {
        let mut c = raw_cfg(&spec, 1);
        c.rank = rank;
        c.world_size = 2;
        seen.extend(
            drain_raw(&mut Loader::new(c).unwrap())
                .into_iter()
                .flat_map(|b| b.0),
        );
    }
    seen.sort();
    assert_eq!(seen, (0..15).map(|i| format!("{i:05}")).collect::<Vec<_>>());

    let mut c = raw_cfg(&spec, 2);
    c.epochs = Some(2);
    c.threads = 2;
    let all = drain_raw(&mut Loader::new(c.clone()).unwrap());
    for k in [1, 5, all.len() - 1] {
        let mut l = Loader::new(c.clone()).unwrap();
        for _ in 0..k {
            l.next_batch(&mut []).unwrap().unwrap();
        }
        let mut l2 = Loader::new(c.clone()).unwrap();
        l2.load_state(l.state().clone()).unwrap();
        assert_eq!(
            drain_raw(&mut l2),
            all[k..].to_vec(),
            "resume after {k} batches"
        );
    }
    let fp = Loader::new(c).unwrap().fingerprint();
    assert!(fp.contains(&("raw", 1)));
}

#[test]
fn raw_mode_skips_or_raises_on_bad_latents() {
    let d = tmpdir("raw-bad");
    let good = safetensors_file(4, "{}");
    let mut cut = good.clone();
    cut.truncate(good.len() - 3);
    let t = tar(
        &[
            ("a.latent.safetensors", &good),
            ("a.txt", b"ok"),
            ("b.latent.safetensors", &cut),
            ("b.txt", b"corrupt"),
            ("c.txt", b"no latent"),
            ("c.jpg", &jpeg(8, 8, 1)),
            ("e.latent.safetensors", &good),
            ("e.json", b"{}"),
        ],
        Long::None,
    );
    let p = d.join("x.tar");
    std::fs::write(&p, t).unwrap();
    let spec = p.display().to_string();
    let mut c = raw_cfg(&spec, 1);
    c.shuffle_buffer = 0;
    let mut l = Loader::new(c.clone()).unwrap();
    let keys: Vec<String> = drain_raw(&mut l).into_iter().flat_map(|b| b.0).collect();
    assert_eq!(
        keys,
        vec!["a", "e"],
        "a missing caption is fine in raw mode"
    );
    let snap = l.stats().snapshot();
    assert_eq!(snap["skipped"]["corrupt_latent"], 1, "{snap}");
    assert_eq!(snap["skipped"]["missing_latent"], 1, "{snap}");
    assert!(snap["skipped"].get("missing_caption").is_none());
    c.on_error = OnError::Raise;
    let mut l = Loader::new(c).unwrap();
    let m = l.next_batch(&mut []).unwrap().unwrap();
    assert_eq!(m.captions, vec!["ok"]);
    let err = l.next_batch(&mut []).unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("x.tar") && msg.contains("b.latent.safetensors"),
        "{msg}"
    );
}

#[test]
fn state_json_resumes_and_refuses_another_configuration() {
    let (_d, spec) = make_shards("state-json", 3, 4);
    let c = cfg(&spec, 2);
    let mut l = Loader::new(c.clone()).unwrap();
    let all = drain(&mut l);
    let mut l = Loader::new(c.clone()).unwrap();
    let mut buf = vec![0u8; l.batch_nbytes()];
    for _ in 0..2 {
        l.next_batch(&mut buf).unwrap().unwrap();
    }
    let text = l.state_json().unwrap();
    let mut l2 = Loader::new(c.clone()).unwrap();
    l2.load_state_json(&text).unwrap();
    assert_eq!(drain(&mut l2), all[2..].to_vec());
    let mut other = c;
    other.seed += 1;
    let err = Loader::new(other)
        .unwrap()
        .load_state_json(&text)
        .unwrap_err();
    assert!(
        matches!(&err, Error::State(m) if m.contains("different seed")),
        "{err:?}"
    );
}

#[test]
fn a_missing_local_shard_keeps_its_io_error_kind() {
    let d = tmpdir("missing");
    let mut c = cfg(&format!("{}/nope.tar", d.display()), 1);
    c.on_error = OnError::Raise;
    let mut l = Loader::new(c).unwrap();
    let mut buf = vec![0u8; l.batch_nbytes()];
    let err = l.next_batch(&mut buf).unwrap_err();
    match &err {
        Error::Io { shard, source, .. } => {
            assert!(shard.ends_with("nope.tar"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains("nope.tar: I/O error at byte 0"),
        "{err}"
    );
}
