//! The root package's integration tests, as one test binary (one link of the whole workspace instead of one
//! per file): end-to-end federations over loopback, hostile peers, crash and restart, the binary from the
//! shell, and cross-checks against Python's reference implementations. `common` holds their shared helpers.

mod calibration_numpy;
mod cli_bench;
mod cli_certs;
mod cli_evaluate;
mod cli_inspect;
mod cli_synth;
mod cli_train;
mod common;
mod console;
mod federation;
mod handshake;
mod interop_python;
mod packaging;
mod privacy;
mod pydicom_crosscheck;
mod resume;
mod rounds;
mod secure;
mod simulate;
mod transport;
