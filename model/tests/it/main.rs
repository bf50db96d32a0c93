//! The model crate's integration tests, as one test binary: the clinical model against statsmodels, our kernels
//! against candle's ops, networks and their files, learning on synthetic cohorts.

mod clinical;
mod dp;
mod kernels;
mod learning;
mod network;
