//! Raw mode's integrity check of a `.safetensors` member, done in the worker threads so that a damaged sample is
//! skipped inside Rust (batch size, order and resume stay exact). Nothing is copied or converted; a member that
//! passes loads with `safetensors.torch.load`.

use crate::decode::Placement;
use crate::samples::{RawSample, RAW_REQUIRED_EXT};

/// Ok if `bytes` is a well-formed safetensors file with at least one tensor; else why not. The parsing and the
/// checks (header length and JSON, string metadata, dtypes, shapes, data offsets covering the buffer exactly)
/// are the `safetensors` crate's, the reference implementation of the format.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let tensors =
        ::safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("safetensors: {e}"))?;
    if tensors.is_empty() {
        return Err("safetensors file holds no tensor".into());
    }
    Ok(())
}

/// Raw mode's "decode": checks the required safetensors member; the sample keeps every member's bytes.
pub(crate) fn check_sample(raw: &RawSample) -> std::result::Result<Placement, String> {
    let latent = raw
        .members
        .iter()
        .find(|m| m.0 == RAW_REQUIRED_EXT)
        .ok_or("latent member missing")?;
    check(&latent.1)?;
    Ok(Placement {
        orig_h: 0,
        orig_w: 0,
        top: 0,
        left: 0,
        flipped: false,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A safetensors file with one F16 tensor `x` of `numel` values and string metadata.
    pub(crate) fn file(numel: usize, meta: &str) -> Vec<u8> {
        let header = format!(
            "{{\"__metadata__\":{meta},\"x\":{{\"dtype\":\"F16\",\"shape\":[{numel}],\"data_offsets\":[0,{}]}}}}",
            2 * numel
        );
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, 2 * numel));
        out
    }

    #[test]
    fn accepts_well_formed_and_rejects_damage() {
        let good = file(6, r#"{"format":"fastlcm-latents-1"}"#);
        assert_eq!(check(&good), Ok(()));
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut garbled = good.clone();
        garbled[8] = b'#';
        let mut extra = good.clone();
        extra.push(0);
        let damaged: [(&str, &[u8]); 6] = [
            ("cut", &good[..good.len() - 1]),
            ("too short", &good[..5]),
            ("huge header length", &huge),
            ("garbled header", &garbled),
            ("trailing byte", &extra),
            ("non-string metadata", &file(6, r#"{"a":1}"#)),
        ];
        for (what, bytes) in damaged {
            let err = check(bytes).expect_err(what);
            assert!(err.starts_with("safetensors"), "{what}: {err}");
        }
        let empty = b"\x02\x00\x00\x00\x00\x00\x00\x00{}";
        assert_eq!(check(empty), Err("safetensors file holds no tensor".into()));
    }
}
