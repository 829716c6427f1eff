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
        assert!(msg.contains("s/000.tar") && msg.contains("512") && msg.contains("boom"), "{msg}");
    }
}
