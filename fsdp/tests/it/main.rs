//! Integration tests, one binary (modules by topic).

mod common;
mod hf;
mod model;
mod reference;
mod train;
