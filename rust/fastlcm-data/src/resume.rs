//! The resume-state format behind `state_dict()` / `load_state_dict()`: a versioned JSON object holding where
//! the stream stands and a fingerprint of the options the stream depends on. Loading checks the version and
//! compares the fingerprint, so a state only ever resumes a loader that produces the same stream.
//!
//! Version 1, every key: `version`, `epoch`, `epoch_start_position`, `position`, `batches_yielded`, `finished`,
//! `shard_counts` and `config` (the fingerprint: `seed`, `batch_size`, `resolution`, `rank`, `world_size`,
//! `shuffle_buffer`, `resampled`, `num_shards`, `shards_hash`, and `raw` in raw mode only). A change of any of
//! these needs a new version number, and loading of version 1 must keep working (checkpoints hold such states).

use serde_json::{json, Map, Value};

use crate::config::{LoaderConfig, ResumeState};
use crate::error::{Error, Result};
use crate::rng::derive_seed;

/// The format version written by `to_json` and the only one `from_json` reads.
pub const VERSION: u64 = 1;

/// Raw mode does not use the resolution; its states have always recorded this value, so they keep loading
/// whatever resolution the options name.
const RAW_MODE_RESOLUTION: u64 = 8;

/// The options a stream depends on (all but `epochs`, `threads` and the per-sample transforms), by name.
pub type Fingerprint = Vec<(&'static str, u64)>;

/// The fingerprint of the stream `cfg` produces from the expanded shard list `urls`.
pub fn fingerprint(cfg: &LoaderConfig, urls: &[String]) -> Fingerprint {
    let url_hash = derive_seed(
        &urls
            .iter()
            .map(|u| derive_seed(&u.bytes().map(u64::from).collect::<Vec<_>>()))
            .collect::<Vec<_>>(),
    );
    let resolution = if cfg.raw {
        RAW_MODE_RESOLUTION
    } else {
        cfg.resolution as u64
    };
    let mut fp = vec![
        ("seed", cfg.seed),
        ("batch_size", cfg.batch_size as u64),
        ("resolution", resolution),
        ("rank", cfg.rank as u64),
        ("world_size", cfg.world_size as u64),
        ("shuffle_buffer", cfg.shuffle_buffer as u64),
        ("resampled", cfg.resampled as u64),
        ("num_shards", urls.len() as u64),
        ("shards_hash", url_hash >> 12), // fits a JSON double exactly
    ];
    if cfg.raw {
        fp.push(("raw", 1)); // only in raw mode, so image-mode state dicts stay as they were
    }
    fp
}

/// The state as a version-1 JSON object string.
pub fn to_json(state: &ResumeState, fingerprint: &[(&str, u64)]) -> String {
    let config: Map<String, Value> = fingerprint
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).into()))
        .collect();
    json!({
        "version": VERSION,
        "epoch": state.epoch,
        "epoch_start_position": state.epoch_start,
        "position": state.position,
        "batches_yielded": state.batches,
        "finished": state.finished,
        "shard_counts": state.shard_counts,
        "config": config,
    })
    .to_string()
}

/// Parses a state written by `to_json` of a loader whose fingerprint is `fingerprint`.
pub fn from_json(text: &str, fingerprint: &[(&str, u64)]) -> Result<ResumeState> {
    let bad = |m: String| Error::State(m);
    let v: Value =
        serde_json::from_str(text).map_err(|e| bad(format!("state_dict is not valid: {e}")))?;
    if v.get("version").and_then(Value::as_u64) != Some(VERSION) {
        return Err(bad(format!(
            "state_dict: unknown or missing 'version' (expected {VERSION})"
        )));
    }
    for (k, want) in fingerprint {
        let got = v
            .get("config")
            .and_then(|c| c.get(*k))
            .and_then(Value::as_u64);
        if got != Some(*want) {
            return Err(bad(format!(
                "state_dict was saved by a loader with a different {k} ({}) than this one ({want}); resume needs \
                 the same configuration",
                got.map(|g| g.to_string())
                    .unwrap_or_else(|| "missing".into())
            )));
        }
    }
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("state_dict: missing integer '{k}'")))
    };
    let shard_counts = match v.get("shard_counts") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64().ok_or_else(|| {
                    bad("state_dict: shard_counts must be a list of non-negative ints".into())
                })
            })
            .collect::<Result<Vec<u64>>>()?,
        Some(_) => return Err(bad("state_dict: shard_counts must be a list".into())),
    };
    Ok(ResumeState {
        epoch: field("epoch")?,
        epoch_start: field("epoch_start_position")?,
        position: field("position")?,
        batches: field("batches_yielded")?,
        finished: v.get("finished").and_then(Value::as_bool).unwrap_or(false),
        shard_counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: [(&str, u64); 2] = [("seed", 3), ("batch_size", 2)];

    fn state() -> ResumeState {
        ResumeState {
            epoch: 1,
            epoch_start: 24,
            position: 30,
            batches: 15,
            finished: false,
            shard_counts: vec![4, 4],
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let text = to_json(&state(), &FP);
        assert_eq!(from_json(&text, &FP).unwrap(), state());
        let v: Value = serde_json::from_str(&text).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "batches_yielded",
                "config",
                "epoch",
                "epoch_start_position",
                "finished",
                "position",
                "shard_counts",
                "version"
            ]
        );
        assert_eq!(v["config"], json!({"seed": 3, "batch_size": 2}));
    }

    #[test]
    fn a_version_1_state_written_before_the_move_loads() {
        // As the bindings wrote it before the format moved into the core (key order as serde_json sorts).
        let text = r#"{"batches_yielded":15,"config":{"batch_size":2,"seed":3},"epoch":1,
                       "epoch_start_position":24,"finished":false,"position":30,"shard_counts":[4,4],"version":1}"#;
        assert_eq!(from_json(text, &FP).unwrap(), state());
        let old = r#"{"version":1,"config":{"batch_size":2,"seed":3},"epoch":0,"epoch_start_position":0,
                      "position":6,"batches_yielded":3}"#; // finished and shard_counts are optional
        let s = from_json(old, &FP).unwrap();
        assert_eq!(
            (s.position, s.finished, s.shard_counts.len()),
            (6, false, 0)
        );
    }

    #[test]
    fn messages_name_what_is_wrong() {
        let msg = |text: &str| from_json(text, &FP).unwrap_err().to_string();
        assert!(msg("{").starts_with("state_dict is not valid: "));
        assert_eq!(
            msg(r#"{"version":2}"#),
            "state_dict: unknown or missing 'version' (expected 1)"
        );
        let other = to_json(&state(), &[("seed", 4), ("batch_size", 2)]);
        assert_eq!(
            msg(&other),
            "state_dict was saved by a loader with a different seed (4) than this one (3); resume needs the same \
             configuration"
        );
        let missing = to_json(&state(), &[("seed", 3)]);
        assert!(msg(&missing).contains("different batch_size (missing) than this one (2)"));
        let mut v: Value = serde_json::from_str(&to_json(&state(), &FP)).unwrap();
        v["position"] = json!(-1);
        assert_eq!(
            msg(&v.to_string()),
            "state_dict: missing integer 'position'"
        );
        v["position"] = json!(30);
        v["shard_counts"] = json!([1, -2]);
        assert!(msg(&v.to_string()).contains("list of non-negative ints"));
        v["shard_counts"] = json!(3);
        assert_eq!(
            msg(&v.to_string()),
            "state_dict: shard_counts must be a list"
        );
        assert!(matches!(from_json("[]", &FP), Err(Error::State(_))));
    }

    #[test]
    fn fingerprint_of_raw_mode_ignores_the_resolution() {
        let urls = vec!["a.tar".to_string(), "b.tar".to_string()];
        let mut c = LoaderConfig::new(urls.clone(), 2);
        let image = fingerprint(&c, &urls);
        assert_eq!(image.len(), 9);
        assert!(image.contains(&("resolution", 512)) && image.contains(&("num_shards", 2)));
        c.raw = true;
        let raw = fingerprint(&c, &urls);
        c.resolution = 1024;
        assert_eq!(fingerprint(&c, &urls), raw);
        assert!(raw.contains(&("resolution", 8)) && raw.contains(&("raw", 1)));
        let other = vec!["a.tar".to_string(), "c.tar".to_string()];
        let hash = |fp: &Fingerprint| fp.iter().find(|(k, _)| *k == "shards_hash").unwrap().1;
        assert_ne!(hash(&fingerprint(&c, &other)), hash(&raw));
        assert!(hash(&raw) < 1 << 52, "fits a JSON double exactly");
    }
}
