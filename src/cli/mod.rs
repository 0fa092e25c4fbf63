//! Subcommands of the `hoard` binary beyond `serve`, one module each; `main.rs` only
//! dispatches to them.

pub mod admin;
pub mod invalidate;
pub mod watch;
