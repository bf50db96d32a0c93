//! The study's three networks in candle (clinical logistic model, MRI ResNet, combined), local training and
//! inference, conversion between `Weights` and candle's `VarMap`, safetensors export.
//!
//! Built by the model issue.
