//! Configuration: the TOML schema, validation that reports every error with
//! its file and key, and the immutable generation that the rest of the
//! gateway reads through an atomically swapped pointer.

mod generation;
mod load;
mod paths;
pub mod schema;
mod secret_file;

pub use generation::{Application, ConfigHandle, Generation, Limits, ResetKey, Timeouts};
pub use load::{load_generation, load_generation_within, ConfigError, ConfigErrors};
pub(crate) use secret_file::check_secret_file;
