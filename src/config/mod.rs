//! Configuration: the TOML schema, validation that reports every error with
//! its file and key, and the immutable generation that the rest of the
//! gateway reads through an atomically swapped pointer.

mod generation;
mod load;
pub mod schema;

pub use generation::{Application, ConfigHandle, Generation, Limits, ResetKey, Timeouts};
pub(crate) use load::check_secret_file_mode;
pub use load::{load_generation, ConfigError, ConfigErrors};
