//! `hoard token new` and `hoard token hash`: making tokens and the hash lines the config
//! stores (`[[auth.token]] hash = "sha256:..."`), so a token itself never goes into a file.

use std::io::Read;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Print a fresh random 256-bit token, then its `hash = "sha256:..."` line for the config.
    /// Give the token to the client (e.g. Bazel's --remote_header=Authorization=Bearer TOKEN);
    /// put only the hash line in `[[auth.token]]`.
    New,
    /// Read a token on stdin (one line; surrounding whitespace ignored) and print its
    /// `sha256:...` hash.
    Hash,
}

pub fn main(command: TokenCommand) -> ExitCode {
    let result = match command {
        TokenCommand::New => new_token_lines(),
        TokenCommand::Hash => hash_stdin(),
    };
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("hoard token: {message}");
            ExitCode::from(2)
        }
    }
}

fn new_token_lines() -> Result<String, String> {
    let token = crate::auth::new_token().map_err(|e| e.to_string())?;
    let hash = crate::auth::hash_token(&token);
    Ok(format!("{token}\nhash = \"{hash}\""))
}

fn hash_stdin() -> Result<String, String> {
    let mut text = String::new();
    std::io::stdin()
        .take(64 << 10)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err("no token on stdin (try: echo \"$TOKEN\" | hoard token hash)".into());
    }
    if token.contains(char::is_whitespace) {
        return Err("the token on stdin contains whitespace; give one token".into());
    }
    Ok(crate::auth::hash_token(token))
}
