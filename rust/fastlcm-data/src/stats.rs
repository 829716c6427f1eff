//! Counters shared by the loader's threads; read at any time with `snapshot()`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Default, Debug)]
pub struct Stats {
    pub samples_read: AtomicU64,
    pub samples_yielded: AtomicU64,
    pub batches_yielded: AtomicU64,
    pub bytes_read: AtomicU64,
    pub shards_opened: AtomicU64,
    pub shards_failed: AtomicU64,
    pub corrupt_image: AtomicU64,
    pub missing_image: AtomicU64,
    pub missing_caption: AtomicU64,
    pub filtered: AtomicU64,
    pub truncated_tar: AtomicU64,
    pub source_error: AtomicU64,
    pub partial_batch: AtomicU64,
    pub read_ns: AtomicU64,
    pub decode_ns: AtomicU64,
    pub wait_ns: AtomicU64,
    /// Raw mode: `corrupt_image` / `missing_image` are reported as `corrupt_latent` / `missing_latent`, and
    /// `missing_caption` (never counted there) is left out.
    pub raw: bool,
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

pub fn add_time(c: &AtomicU64, d: Duration) {
    c.fetch_add(d.as_nanos() as u64, Relaxed);
}

impl Stats {
    /// The contract's `stats()` dict: counters, `skipped` by reason, and `timings_s` (read: reader thread time
    /// in source + tar; decode: summed over decode threads; wait: time the caller waited for batches).
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let s = |c: &AtomicU64| c.load(Relaxed) as f64 * 1e-9;
        let mut v = serde_json::json!({
            "samples_read": g(&self.samples_read),
            "samples_yielded": g(&self.samples_yielded),
            "batches_yielded": g(&self.batches_yielded),
            "bytes_read": g(&self.bytes_read),
            "shards_opened": g(&self.shards_opened),
            "shards_failed": g(&self.shards_failed),
            "skipped": {
                "corrupt_image": g(&self.corrupt_image),
                "missing_image": g(&self.missing_image),
                "missing_caption": g(&self.missing_caption),
                "filtered": g(&self.filtered),
                "truncated_tar": g(&self.truncated_tar),
                "source_error": g(&self.source_error),
                "partial_batch": g(&self.partial_batch),
            },
            "timings_s": {"read": s(&self.read_ns), "decode": s(&self.decode_ns), "wait": s(&self.wait_ns)},
        });
        if self.raw {
            let skipped = v["skipped"].as_object_mut().expect("skipped is an object");
            skipped.remove("missing_caption");
            for (from, to) in [
                ("corrupt_image", "corrupt_latent"),
                ("missing_image", "missing_latent"),
            ] {
                let n = skipped.remove(from).expect("counter present");
                skipped.insert(to.to_string(), n);
            }
        }
        v
    }
}
