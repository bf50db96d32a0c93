//! The protocol crate's codec tests, as one test binary: property tests and each refusal of the decoder.
//! (`tests/alloc.rs` stays a binary of its own: it installs a counting global allocator.)

mod codec_props;
mod codec_rejects;
