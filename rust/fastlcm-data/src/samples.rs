//! Group tar members into samples with webdataset's rules and pick image + caption + json.
//!
//! Key/extension split at the first dot of the basename (`dir/a.b.jpg` → key `dir/a`, ext `b.jpg`);
//! extensions lower-cased; a new sample starts when the key changes or an extension repeats; `__…__` members
//! and names without an extension are skipped.

use std::collections::HashSet;
use std::sync::Arc;

use crate::tar::Entry;

pub const IMAGE_EXTS: [&str; 4] = ["jpg", "png", "jpeg", "webp"];
pub const CAPTION_EXTS: [&str; 3] = ["text", "txt", "caption"];
/// Raw mode: the member every sample must have (a cached-latents sample's tensors).
pub const RAW_REQUIRED_EXT: &str = "latent.safetensors";

/// Splits a member name into (key, lower-cased extension), or None for names webdataset ignores.
pub fn split_name(name: &str) -> Option<(String, String)> {
    let slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let base = &name[slash..];
    if slash == 0 && name.starts_with("__") && name.ends_with("__") {
        return None;
    }
    if let Some(rest) = name.strip_prefix("__") {
        // webdataset: `__[^/]*__($|/)` at the start of the path.
        if let Some(end) = rest.find("__") {
            let after = &rest[end + 2..];
            if !rest[..end].contains('/') && (after.is_empty() || after.starts_with('/')) {
                return None;
            }
        }
    }
    let dot = base.find('.')?;
    if dot == 0 {
        return None;
    }
    Some((
        name[..slash + dot].to_string(),
        base[dot + 1..].to_ascii_lowercase(),
    ))
}

/// Members of one sample, as grouped (only the extensions the loader uses keep their bytes).
#[derive(Debug, Default)]
pub struct Group {
    pub key: String,
    pub offset: u64,
    exts: HashSet<String>,
    kept: Vec<(String, String, Vec<u8>, u64)>, // (ext, member name, data, offset)
}

impl Group {
    fn get(&self, ext: &str) -> Option<&(String, String, Vec<u8>, u64)> {
        self.kept.iter().find(|m| m.0 == ext)
    }
}

/// Streaming grouper: feed entries in order; it returns each finished group.
#[derive(Default)]
pub struct Grouper {
    current: Option<Group>,
    keep_all: bool,
}

impl Grouper {
    /// A grouper that keeps the bytes of every member (raw mode), not only image/caption/json.
    pub fn keep_all() -> Self {
        Grouper {
            current: None,
            keep_all: true,
        }
    }

    pub fn push(&mut self, e: Entry) -> Option<Group> {
        let (key, ext) = split_name(&e.name)?;
        let mut done = None;
        let start_new = match &self.current {
            None => true,
            Some(g) => g.key != key || g.exts.contains(&ext),
        };
        if start_new {
            done = self.current.take();
            self.current = Some(Group {
                key,
                offset: e.offset,
                ..Default::default()
            });
        }
        let g = self.current.as_mut().expect("current group");
        g.exts.insert(ext.clone());
        if self.keep_all
            || IMAGE_EXTS.contains(&ext.as_str())
            || CAPTION_EXTS.contains(&ext.as_str())
            || ext == "json"
        {
            g.kept.push((ext, e.name, e.data, e.offset));
        }
        done
    }

    pub fn finish(&mut self) -> Option<Group> {
        self.current.take()
    }
}

/// A sample still compressed, ready for the shuffle buffer.
#[derive(Debug, Clone)]
pub struct RawSample {
    pub key: String,
    pub shard: Arc<str>,
    pub image_member: String,
    pub image_offset: u64,
    pub image: Vec<u8>,
    pub caption: Vec<u8>,
    pub json: Option<Vec<u8>>,
    /// Raw mode: every member as (extension, bytes) in tar order (`image` is then empty); image mode: empty.
    pub members: Vec<(String, Vec<u8>)>,
}

/// Why a sample was dropped before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    MissingImage,
    MissingCaption,
    Filtered,
}

impl Reject {
    pub fn name(self) -> &'static str {
        match self {
            Reject::MissingImage => "missing_image",
            Reject::MissingCaption => "missing_caption",
            Reject::Filtered => "filtered",
        }
    }
}

/// The SDXL script's metadata filters (all off by default).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub min_original_width: u64,
    pub min_original_height: u64,
    pub max_pwatermark: Option<f64>,
}

impl Filters {
    pub fn active(&self) -> bool {
        self.min_original_width > 0 || self.min_original_height > 0 || self.max_pwatermark.is_some()
    }

    /// A sample passes if its json has the fields and they are within bounds; missing json or fields fail.
    pub fn pass(&self, json: Option<&[u8]>) -> bool {
        if !self.active() {
            return true;
        }
        let Some(v) = json.and_then(|j| serde_json::from_slice::<serde_json::Value>(j).ok()) else {
            return false;
        };
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        if self.min_original_width > 0
            && num("original_width").is_none_or(|w| w < self.min_original_width as f64)
        {
            return false;
        }
        if self.min_original_height > 0
            && num("original_height").is_none_or(|h| h < self.min_original_height as f64)
        {
            return false;
        }
        if let Some(m) = self.max_pwatermark {
            if num("pwatermark").is_none_or(|p| p > m) {
                return false;
            }
        }
        true
    }
}

/// Picks image (first of jpg, png, jpeg, webp), caption (first of text, txt, caption) and json.
pub fn select(g: Group, shard: &Arc<str>, filters: &Filters) -> Result<RawSample, Reject> {
    let img = IMAGE_EXTS
        .iter()
        .find_map(|e| g.get(e))
        .ok_or(Reject::MissingImage)?;
    let cap = CAPTION_EXTS
        .iter()
        .find_map(|e| g.get(e))
        .ok_or(Reject::MissingCaption)?;
    let json = g.get("json").map(|j| j.2.clone());
    if !filters.pass(json.as_deref()) {
        return Err(Reject::Filtered);
    }
    let (img_member, img_offset) = (img.1.clone(), img.3);
    let caption = cap.2.clone();
    let mut kept = g.kept;
    let pos = kept
        .iter()
        .position(|m| m.1 == img_member && m.3 == img_offset)
        .expect("image present");
    let image = kept.swap_remove(pos).2;
    Ok(RawSample {
        key: g.key,
        shard: shard.clone(),
        image_member: img_member,
        image_offset: img_offset,
        image,
        caption,
        json,
        members: Vec::new(),
    })
}

/// Raw mode: requires a `RAW_REQUIRED_EXT` member (else `MissingImage`, reported as missing_latent); the caption
/// is optional; json filters apply; every member's bytes are kept.
pub fn select_raw(g: Group, shard: &Arc<str>, filters: &Filters) -> Result<RawSample, Reject> {
    let (member, offset) = g
        .get(RAW_REQUIRED_EXT)
        .map(|m| (m.1.clone(), m.3))
        .ok_or(Reject::MissingImage)?;
    let json = g.get("json").map(|j| j.2.clone());
    if !filters.pass(json.as_deref()) {
        return Err(Reject::Filtered);
    }
    let caption = CAPTION_EXTS
        .iter()
        .find_map(|e| g.get(e))
        .map(|c| c.2.clone())
        .unwrap_or_default();
    Ok(RawSample {
        key: g.key,
        shard: shard.clone(),
        image_member: member,
        image_offset: offset,
        image: Vec::new(),
        caption,
        json,
        members: g.kept.into_iter().map(|m| (m.0, m.2)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, data: &[u8]) -> Entry {
        Entry {
            name: name.into(),
            data: data.to_vec(),
            offset: 0,
        }
    }

    fn groups(names: &[&str]) -> Vec<(String, Vec<String>)> {
        let mut g = Grouper::default();
        let mut out: Vec<Group> = names
            .iter()
            .filter_map(|n| g.push(entry(n, b"d")))
            .collect();
        out.extend(g.finish());
        out.into_iter()
            .map(|g| {
                let mut e: Vec<String> = g.exts.into_iter().collect();
                e.sort();
                (g.key, e)
            })
            .collect()
    }

    #[test]
    fn split_rules() {
        assert_eq!(split_name("a.b.JPG"), Some(("a".into(), "b.jpg".into())));
        assert_eq!(
            split_name("dir.x/k.txt"),
            Some(("dir.x/k".into(), "txt".into()))
        );
        assert_eq!(split_name("noext"), None);
        assert_eq!(split_name(".hidden"), None);
        assert_eq!(split_name("__index__"), None);
        assert_eq!(split_name("__meta__/x.txt"), None);
        assert_eq!(
            split_name("d/__key__.json"),
            Some(("d/__key__".into(), "json".into()))
        );
    }

    #[test]
    fn grouping_on_key_change_and_repeated_ext() {
        let g = groups(&[
            "a.jpg",
            "a.txt",
            "b.jpg",
            "b.JPG",
            "b.txt",
            "__index__",
            "c.txt",
        ]);
        assert_eq!(
            g,
            vec![
                ("a".into(), vec!["jpg".into(), "txt".into()]),
                ("b".into(), vec!["jpg".into()]),
                ("b".into(), vec!["jpg".into(), "txt".into()]),
                ("c".into(), vec!["txt".into()]),
            ]
        );
    }

    #[test]
    fn selection_priority_and_rejections() {
        let shard: Arc<str> = Arc::from("s.tar");
        let mut gr = Grouper::default();
        for (n, d) in [
            ("k.webp", &b"W"[..]),
            ("k.png", b"P"),
            ("k.caption", b"C"),
            ("k.txt", b"T"),
            ("k.json", b"{}"),
        ] {
            assert!(gr.push(entry(n, d)).is_none());
        }
        let s = select(gr.finish().unwrap(), &shard, &Filters::default()).unwrap();
        assert_eq!(
            (
                s.image.as_slice(),
                s.caption.as_slice(),
                s.image_member.as_str()
            ),
            (&b"P"[..], &b"T"[..], "k.png")
        );
        assert_eq!(s.json.as_deref(), Some(&b"{}"[..]));
        gr.push(entry("m.txt", b"x"));
        assert_eq!(
            select(gr.finish().unwrap(), &shard, &Filters::default()).unwrap_err(),
            Reject::MissingImage
        );
        gr.push(entry("m.jpg", b"x"));
        assert_eq!(
            select(gr.finish().unwrap(), &shard, &Filters::default()).unwrap_err(),
            Reject::MissingCaption
        );
    }

    #[test]
    fn filters_follow_json() {
        let f = Filters {
            min_original_width: 100,
            min_original_height: 0,
            max_pwatermark: Some(0.5),
        };
        assert!(f.pass(Some(br#"{"original_width": 100, "pwatermark": 0.5}"#)));
        assert!(!f.pass(Some(br#"{"original_width": 99, "pwatermark": 0.1}"#)));
        assert!(!f.pass(Some(br#"{"original_width": 200, "pwatermark": 0.9}"#)));
        assert!(!f.pass(Some(b"not json")));
        assert!(!f.pass(None));
        assert!(Filters::default().pass(None));
    }
}
