//! One typed error for the whole data path; every variant carries where it happened.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    /// Bad argument given by the caller (flag / option name in the message).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// I/O failure while reading a shard.
    #[error("{shard}: I/O error at byte {offset}: {source}")]
    Io {
        shard: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The shard could not be opened or its byte stream failed (HTTP status, pipe exit code, stall).
    #[error("{shard}: source error at byte {offset}: {message}")]
    Source {
        shard: String,
        offset: u64,
        message: String,
    },
    /// The shard is not a well-formed tar (bad header, checksum, oversized member) or ends early.
    #[error("{shard}: {}tar error at byte {offset}{}: {message}",
            if *truncated { "truncated " } else { "" },
            member.as_deref().map(|m| format!(" (member {m})")).unwrap_or_default())]
    Tar {
        shard: String,
        member: Option<String>,
        offset: u64,
        truncated: bool,
        message: String,
    },
    /// An image member could not be decoded.
    #[error("{shard}: cannot decode member {member} at byte {offset}: {message}")]
    Decode {
        shard: String,
        member: String,
        offset: u64,
        message: String,
    },
    /// Every source failed or nothing decodes: raised instead of spinning forever.
    #[error("no data: {0}")]
    NoData(String),
    /// `max_consecutive_rejections` samples in a row were skipped.
    #[error(
        "{count} consecutive samples were rejected (last shard {shard}, last reason: {reason}); \
             check the shards or raise max_consecutive_rejections"
    )]
    TooManyRejections {
        count: u64,
        shard: String,
        reason: String,
    },
    /// A resume state that cannot be loaded: malformed, of an unknown version, inconsistent, or saved by a
    /// loader with another configuration (the message starts with `state_dict`).
    #[error("{0}")]
    State(String),
    /// Misuse of the loader object itself (e.g. used after fork).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The shard URL the error is about, if any.
    pub fn shard(&self) -> Option<&str> {
        match self {
            Error::Io { shard, .. }
            | Error::Source { shard, .. }
            | Error::Tar { shard, .. }
            | Error::Decode { shard, .. }
            | Error::TooManyRejections { shard, .. } => Some(shard),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_names_shard_and_offset() {
        let e = Error::Io {
            shard: "s/000.tar".into(),
            offset: 512,
            source: std::io::Error::other("boom"),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("s/000.tar") && msg.contains("512") && msg.contains("boom"),
            "{msg}"
        );
    }

    #[test]
    fn tar_error_names_member_and_truncation() {
        let e = Error::Tar {
            shard: "a.tar".into(),
            member: Some("k.jpg".into()),
            offset: 1024,
            truncated: true,
            message: "stream ended".into(),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("truncated") && msg.contains("k.jpg") && msg.contains("1024"),
            "{msg}"
        );
        assert_eq!(e.shard(), Some("a.tar"));
    }
}
