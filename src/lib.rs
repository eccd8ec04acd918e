//! ditc: an offline optimizing compiler for video Diffusion Transformers.
//!
//! Data flow: a checkpoint is read into the [`ir`] graph ([`onnx`] for ONNX files; [`checkpoint`] +
//! [`models`] for diffusers safetensors folders), analysed into a DiT
//! map ([`analysis`]), rewritten by passes, and written back as ONNX plus a [`manifest`]. The
//! [`runtime`] runs any graph on CPU with tract to verify it.

pub mod analysis;
pub mod calibration;
pub mod checkpoint;
#[cfg(feature = "tract")]
pub mod cli;
pub mod finite;
pub mod fp8;
pub mod integrity;
pub mod ir;
pub mod lint;
pub mod manifest;
pub mod metrics;
pub mod models;
pub mod onnx;
pub mod output;
pub mod passes;
#[cfg(feature = "tract")]
pub mod plot;
pub mod progress;
pub mod recipe;
#[cfg(feature = "tract")]
pub mod report;
#[cfg(feature = "tract")]
pub mod runtime;
pub mod schedule;
pub mod target;
pub mod tensors;
