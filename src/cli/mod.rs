//! Subcommands of the `hoard` binary beyond `serve`, one module each; `main.rs` only
//! dispatches to them.

pub mod admin;
pub mod check_config;
pub mod hook;
pub mod invalidate;
pub mod provenance;
pub mod token;
pub mod top;
pub mod watch;

/// A reply as one line of JSON, with the proto's field names (serde is derived on the replies
/// the CLI prints; see `build.rs`). It goes through `serde_json::Value`, whose keys are sorted,
/// so the text does not change when fields are reordered in the proto.
pub(crate) fn json<T: serde::Serialize>(reply: &T) -> Result<String, String> {
    serde_json::to_value(reply)
        .map(|v| v.to_string())
        .map_err(|e| format!("cannot encode the reply as JSON: {e}"))
}
