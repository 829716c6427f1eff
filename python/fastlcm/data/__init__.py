"""Data path: the Rust-backed ShardLoader and a slow pure-Python reference reader (a test oracle)."""
