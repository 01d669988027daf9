//! Integration tests, one binary (modules by topic).

mod cli;
mod common;
mod gpu_model;
mod hf;
mod model;
mod reference;
mod train;
